//! The reporter thread: symbolizes each snapshot's stacks, renders the report and writes it.
//! It owns the blazesym symbolizer (not `Send`) and its caches, off the event path.

use std::{io, sync::mpsc, thread};

use crate::{
    output::Output,
    proc_maps::ProcMaps,
    render::{Format, Report, Style, Target},
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
        style: Style,
        mut out: Output,
    ) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Snapshot>();
        let handle = thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                let mut symbolizer = StackSymbolizer::new(target.pid, maps);
                let mut rendered = Vec::new();
                for snapshot in rx {
                    if !out.wants(snapshot.last) {
                        continue;
                    }
                    symbolizer.refresh_maps();
                    let frames: Vec<_> = snapshot
                        .stacks
                        .iter()
                        .map(|s| symbolizer.symbolize(&s.addresses))
                        .collect();
                    rendered.clear();
                    format.render(
                        &Report {
                            target: &target,
                            snapshot: &snapshot,
                            frames: &frames,
                            style,
                        },
                        &mut rendered,
                    )?;
                    match out.write(&rendered, snapshot.timestamp_ms) {
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
