//! The program's process group: the unit the runner stops. The program is
//! started as the leader of a new group (its pgid is its pid), so whatever
//! it starts (a shell's pipeline, a background `sleep &`) stays in the
//! group unless it deliberately leaves it with `setsid` or `setpgid`, and
//! one `killpg` reaches all of it. A guard sends SIGKILL to the group if
//! the run is dropped before it finished, so a dropped job leaves nothing
//! running.

use rustix::io::Errno;
use rustix::process::{Pid, Signal as RawSignal, kill_process_group, test_kill_process_group};

/// A live process group that the runner owns.
#[derive(Debug)]
pub(crate) struct Group {
    pgid: Pid,
    /// Whether dropping the guard sends SIGKILL: true until the runner has
    /// seen the group gone (or done all it can).
    armed: bool,
}

impl Group {
    /// The group led by the just-spawned child `pid`; `None` only for a
    /// pid no process can have.
    pub(crate) fn led_by(pid: u32) -> Option<Self> {
        let pgid = Pid::from_raw(i32::try_from(pid).ok()?)?;
        Some(Self { pgid, armed: true })
    }

    /// Sends `signal` to every process of the group. A group already gone
    /// is not an error, and neither is a member this process may not
    /// signal: [`Group::alive`] notices it and the cleanup reports it.
    pub(crate) fn signal(&self, signal: RawSignal) {
        let _ = kill_process_group(self.pgid, signal);
    }

    /// Whether any process of the group is still alive.
    ///
    /// `killpg(pgid, 0)` answering ESRCH is the proof that nothing is left.
    /// While it finds members, they may all be dead already: orphans that
    /// died wait as zombies for PID 1 (or a subreaper) to reap them, and
    /// some init processes reap only every second or two. On Linux those
    /// are told apart by their state in `/proc`, so a stopped group is not
    /// reported alive for as long as someone else's reaper sleeps.
    pub(crate) async fn alive(&self) -> bool {
        match test_kill_process_group(self.pgid) {
            Err(Errno::SRCH) => false,
            // EPERM: a member this process may not signal (a setuid
            // program) is alive as far as the runner can tell.
            Err(_) => true,
            Ok(()) => self.any_member_not_zombie().await,
        }
    }

    #[cfg(target_os = "linux")]
    async fn any_member_not_zombie(&self) -> bool {
        let pgid = self.pgid.as_raw_nonzero().get();
        // Reading /proc is file I/O: keep it off the async workers.
        tokio::task::spawn_blocking(move || procfs::any_live_member(pgid))
            .await
            .ok()
            .and_then(Result::ok)
            // Cannot tell (no /proc): assume alive, the safe side.
            .unwrap_or(true)
    }

    #[cfg(not(target_os = "linux"))]
    async fn any_member_not_zombie(&self) -> bool {
        true
    }

    /// The runner is done with the group: dropping the guard no longer
    /// signals it (its pgid may be reused once it is gone).
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if self.armed {
            self.signal(RawSignal::KILL);
        }
    }
}

#[cfg(target_os = "linux")]
mod procfs {
    use std::io;

    /// Whether any process in `/proc` is in group `pgid` and not a zombie.
    pub(super) fn any_live_member(pgid: i32) -> io::Result<bool> {
        for entry in std::fs::read_dir("/proc")? {
            let name = entry?.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            // A process may end between listing and reading: skip it.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            if let Some((state, member_of)) = state_and_pgrp(&stat)
                && member_of == pgid
                && !matches!(state, "Z" | "X")
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The state and process group of a `/proc/PID/stat` line:
    /// `pid (comm) state ppid pgrp ...`, where `comm` may itself hold
    /// spaces and parentheses, so fields are counted from the last `)`.
    pub(super) fn state_and_pgrp(stat: &str) -> Option<(&str, i32)> {
        let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
        let state = fields.next()?;
        let _ppid = fields.next()?;
        let pgrp = fields.next()?.parse().ok()?;
        Some((state, pgrp))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn stat_fields_are_found_after_an_awkward_comm() {
            let stat = "4242 (a) b) (c) S 1 4240 4240 0 -1 4194560 ...";
            assert_eq!(state_and_pgrp(stat), Some(("S", 4240)));
            assert_eq!(state_and_pgrp("garbage"), None);
        }
    }
}
