//! What the thread that starts a load hears while its readers work: the
//! running total, and a tick every [`TICK`] whatever the readers do, so that
//! it can notice an interruption (Python checks for Ctrl-C there) and stop
//! the load.

use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How often the calling thread hears [`Progress::Tick`], reads or not.
pub(crate) const TICK: Duration = Duration::from_millis(50);

/// What the calling thread of a load hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More bytes arrived: the total so far (for a staged load, bytes whose
    /// copy started; for a host sink, done).
    Done(usize),
    /// Another 50 ms have passed: a chance to check for an interruption.
    Tick,
}

/// What the readers of a load sent, in all.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Relayed {
    /// Messages (one per chunk or read done).
    pub messages: usize,
    /// The sum of the lengths they carried.
    pub bytes: usize,
}

/// Runs on the calling thread while readers run, until every reader has
/// dropped its sender: each `len` a reader sends is reported as the running
/// total, in order, and a tick every [`TICK`]. The first error `progress`
/// returns goes to `stop` (the readers should then end soon), and nothing
/// more is reported; `stopped` says whether the load already stopped for
/// another reason. Returns what the readers sent.
pub(crate) fn relay<E>(
    done_rx: mpsc::Receiver<usize>,
    mut progress: impl FnMut(Progress) -> Result<(), E>,
    stopped: impl Fn() -> bool,
    mut stop: impl FnMut(E),
) -> Relayed {
    let (mut done, mut messages) = (0, 0);
    let mut next_tick = Instant::now() + TICK;
    loop {
        let now = Instant::now();
        let heard = if now >= next_tick {
            next_tick = now + TICK;
            Progress::Tick
        } else {
            match done_rx.recv_timeout(next_tick - now) {
                Ok(len) => {
                    done += len;
                    messages += 1;
                    Progress::Done(done)
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                // Every reader has ended.
                Err(mpsc::RecvTimeoutError::Disconnected) => return Relayed { messages, bytes: done },
            }
        };
        if !stopped()
            && let Err(e) = progress(heard)
        {
            stop(e);
        }
    }
}
