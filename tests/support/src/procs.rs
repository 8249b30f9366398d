//! Processes as Linux's `/proc` shows them, for tests that must prove that
//! a process-pool child, and whatever its job started, is gone: who is
//! whose child, who is in which process group, and who is still alive (a
//! zombie is not: it has exited and only waits to be reaped).

use std::time::{Duration, Instant};

/// One process, from `/proc/PID/stat` and `/proc/PID/cmdline`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proc {
    /// Its pid.
    pub pid: u32,
    /// Its parent's pid.
    pub ppid: u32,
    /// Its process group.
    pub pgrp: u32,
    /// Its state letter (`R`, `S`, `Z`, ...).
    pub state: char,
    /// Its arguments, joined by spaces.
    pub cmdline: String,
}

impl Proc {
    /// Whether it runs (or could): not a zombie, not dead.
    pub fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }
}

/// The process `pid`, if it exists.
pub fn get(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`: comm may hold spaces and
    // parentheses, so the fields are counted from the last `)`.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .split('\0')
                .filter(|arg| !arg.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    Some(Proc {
        pid,
        ppid,
        pgrp,
        state,
        cmdline,
    })
}

/// Every process this test can see.
pub fn all() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        // A process may end between the listing and the read: skipped.
        .filter_map(get)
        .collect()
}

/// Whether `pid` is alive (exists and is not a zombie).
pub fn alive(pid: u32) -> bool {
    get(pid).is_some_and(|p| p.alive())
}

/// The live children of `pid`.
pub fn children_of(pid: u32) -> Vec<Proc> {
    all()
        .into_iter()
        .filter(|p| p.ppid == pid && p.alive())
        .collect()
}

/// The live members of process group `pgrp`.
pub fn in_group(pgrp: u32) -> Vec<Proc> {
    all()
        .into_iter()
        .filter(|p| p.pgrp == pgrp && p.alive())
        .collect()
}

/// The live process-pool children of the jobd process `jobd`.
pub fn pool_children(jobd: u32) -> Vec<Proc> {
    children_of(jobd)
        .into_iter()
        .filter(|p| p.cmdline.contains("--jobd-process-child"))
        .collect()
}

/// Looks at `/proc` every 10 ms until `check` finds what it wants, and
/// returns that; panics after `limit`, saying `what` and the last look.
/// Process state has no event a test can await, so it is looked at again;
/// the bound keeps a failing test short.
pub fn wait_for<T, F>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Result<T, String>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check() {
            Ok(found) => return found,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {limit:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
