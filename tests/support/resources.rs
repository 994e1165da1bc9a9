//! What a test counts to show that a component released what it held: descriptors, sockets,
//! threads and tasks, read before and after.

use std::time::Duration;
use tokio::time::{Instant, sleep};

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Distinct sockets the process holds open. Sockets, not file descriptors: another test of the
/// same binary starting its runtime meanwhile opens descriptors of its own (an epoll, an eventfd,
/// a duplicate of the signal socket), which are no leak of the one being counted.
pub fn open_sockets() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Threads of this process (lapin runs one I/O thread per connection).
pub fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Tasks alive on the current runtime.
pub fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Waits until `count()` is at most `limit`, and returns the last count. Gives up after 30 s: on a
/// loaded machine a last reconnect attempt can take seconds to wind down, and a count that is
/// still high then is a leak.
pub async fn settles_to(count: impl Fn() -> usize, limit: usize) -> usize {
    let started = Instant::now();
    loop {
        let now = count();
        if now <= limit || started.elapsed() > Duration::from_secs(30) {
            return now;
        }
        sleep(Duration::from_millis(20)).await;
    }
}
