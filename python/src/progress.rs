//! Progress callbacks of long loads: `progress(done, total)` from Python,
//! called on the loading thread at a bounded rate.

use pyo3::prelude::*;

/// How far a load gets between two calls of its `progress(done, total)`
/// (and one call at the end): a callback per 4 MiB chunk would cost a GIL
/// acquisition each, 25,000 for 100 GB.
pub(crate) const PROGRESS_STEP: usize = 64 << 20;

/// When a load calls its `progress(done, total)`: at `first` bytes done, then
/// every [`PROGRESS_STEP`] (the end is the caller's to report).
pub(crate) struct ProgressSteps {
    next: usize,
}

impl ProgressSteps {
    pub(crate) fn new(first: usize) -> ProgressSteps {
        ProgressSteps { next: first }
    }

    /// Whether `done` bytes call for a report (counted as made if so).
    pub(crate) fn due(&mut self, done: usize) -> bool {
        let due = done >= self.next;
        if due {
            self.next = done + PROGRESS_STEP;
        }
        due
    }
}

/// `progress(done, total)` at the first report, then every [`PROGRESS_STEP`]
/// bytes, and at the end; with the GIL taken for each call.
pub(crate) fn progress_reporter(progress: Option<&Py<PyAny>>, total: usize) -> impl FnMut(usize) -> PyResult<()> + '_ {
    let mut steps = ProgressSteps::new(0);
    move |done| match progress {
        Some(callback) if done == total || steps.due(done) => Python::attach(|py| callback.call1(py, (done, total)).map(drop)),
        _ => Ok(()),
    }
}
