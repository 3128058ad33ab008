//! The reporter thread: symbolizes each snapshot's stacks, renders the report and writes it.
//! It owns the blazesym symbolizer (not `Send`) and its caches, off the event path.

use std::{
    io::{self, Write as _},
    sync::mpsc,
    thread,
};

use crate::{
    proc_maps::ProcMaps,
    render::{Format, Report, Target},
    report::Snapshot,
    symbolize::StackSymbolizer,
};

pub struct Reporter {
    tx: mpsc::Sender<Snapshot>,
    handle: thread::JoinHandle<io::Result<()>>,
}

impl Reporter {
    pub fn spawn(
        target: Target,
        maps: ProcMaps,
        format: Format,
        mut out: Box<dyn io::Write + Send>,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Snapshot>();
        let handle = thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                let mut symbolizer = StackSymbolizer::new(target.pid, maps);
                let mut text = String::new();
                for snapshot in rx {
                    symbolizer.refresh_maps();
                    let stacks: Vec<&[u64]> =
                        snapshot.stacks.iter().map(|s| &*s.addresses).collect();
                    let frames = symbolizer.symbolize_stacks(&stacks);
                    text.clear();
                    format.render(
                        &Report {
                            target: &target,
                            snapshot: &snapshot,
                            frames: &frames,
                        },
                        &mut text,
                    );
                    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                        // A reader that went away (`| head`) is not an error.
                        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
                        other => other?,
                    }
                }
                Ok(())
            })?;
        Ok(Self { tx, handle })
    }

    /// Queues a snapshot; never blocks the event path.
    pub fn send(&self, snapshot: Snapshot) {
        // The thread only ends early on a broken pipe; then there is nobody to report to.
        let _ = self.tx.send(snapshot);
    }

    /// Waits until every queued report is written.
    pub fn finish(self) -> io::Result<()> {
        drop(self.tx);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reporter thread panicked")))
    }
}

/// One output shared by several reporters: each report is written whole, under the lock, so
/// reports of different processes never interleave.
#[derive(Clone)]
pub struct SharedWriter(std::sync::Arc<std::sync::Mutex<Box<dyn io::Write + Send>>>);

impl SharedWriter {
    pub fn new(out: Box<dyn io::Write + Send>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(out)))
    }
}

impl io::Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = self
            .0
            .lock()
            .map_err(|_| io::Error::other("a reporter thread panicked"))?;
        out.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("a reporter thread panicked"))?
            .flush()
    }
}
