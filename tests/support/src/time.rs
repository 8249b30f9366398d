//! Virtual time for tests that run jobd on tokio's paused clock.
//!
//! A paused runtime moves its clock on by itself whenever it has nothing to
//! do (auto-advance). That is what a test wants while only tasks of the
//! runtime are involved; but jobd also works on threads of its own (the
//! blocking pool, the SQLite writer), and while they work the runtime may
//! look idle and jump ahead. [`freeze_clock`] stops that: tokio does not
//! auto-advance while a blocking task runs, so a blocking task waits until
//! the returned guard is dropped, and time moves only by
//! `tokio::time::advance`.

/// Keeps the paused clock still (see the module docs) while it lives.
#[derive(Debug)]
pub struct FrozenClock {
    _release: std::sync::mpsc::Sender<()>,
}

/// Freezes the current paused runtime's clock until the guard is dropped.
pub fn freeze_clock() -> FrozenClock {
    let (release, held) = std::sync::mpsc::channel::<()>();
    // Ends when the guard's sender is dropped.
    drop(tokio::task::spawn_blocking(move || {
        let _ = held.recv();
    }));
    FrozenClock { _release: release }
}
