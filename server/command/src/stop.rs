//! Stopping a process group that someone else spawned: the same SIGTERM,
//! grace, SIGKILL and "verified gone" that [`run`](crate::run) applies to
//! its programs, for callers that keep a long-lived child of their own
//! (jobd's process pool keeps one child per slot, across many jobs).

use std::io;
use std::time::Duration;

use rustix::process::Signal as RawSignal;
use tokio::process::Child;

use crate::ending::{Exit, GroupCleanup};
use crate::group::Group;
use crate::run::clean_up;

/// The process group a child leads (it was spawned with
/// `process_group(0)`, so its pgid is its pid), owned by the caller until
/// it is seen gone. Dropping it before [`ProcessGroup::stop`] completed
/// sends SIGKILL to the whole group, so a dropped owner leaves nothing
/// running.
#[derive(Debug)]
pub struct ProcessGroup {
    group: Group,
    pid: u32,
}

/// What stopping a group found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStop {
    /// How the leader died; `None` if it could not be reaped even after
    /// SIGKILL (see [`GroupCleanup::Lingering`]).
    pub exit: Option<Exit>,
    /// What had to be done to the group.
    pub cleanup: GroupCleanup,
}

impl ProcessGroup {
    /// The group `child` leads. Call it right after the spawn, before the
    /// child is waited for (a reaped child has no pid any more).
    ///
    /// # Errors
    ///
    /// When the child has already been reaped.
    pub fn led_by(child: &Child) -> io::Result<Self> {
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the child has already been reaped"))?;
        let group = Group::led_by(pid)
            .ok_or_else(|| io::Error::other(format!("{pid} is not a valid process id")))?;
        Ok(Self { group, pid })
    }

    /// The leader's pid, which is also the group's id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends SIGKILL to every process of the group at once, without
    /// waiting (for an owner that is about to go away).
    pub fn kill(&self) {
        self.group.signal(RawSignal::KILL);
    }

    /// Makes sure nothing of the group is left alive and the leader
    /// (`child`) is reaped: nothing to do when the leader has exited and
    /// the group is empty; else SIGTERM, up to `grace` for the group to be
    /// gone, SIGKILL, and a bounded wait again. Processes that left the
    /// group (`setsid`, `setpgid`) are out of reach.
    ///
    /// # Errors
    ///
    /// When the leader could not be waited for (something else reaped it);
    /// the group was sent SIGKILL.
    pub async fn stop(mut self, child: &mut Child, grace: Duration) -> io::Result<GroupStop> {
        let status = child.try_wait()?;
        let (status, cleanup) = clean_up(&self.group, child, status, grace).await?;
        self.group.disarm();
        Ok(GroupStop {
            exit: status.map(Exit::from_status),
            cleanup,
        })
    }
}
