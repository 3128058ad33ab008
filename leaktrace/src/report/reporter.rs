//! The reporter thread: symbolizes each snapshot's stacks, renders the report and writes it.
//! It owns the blazesym symbolizer (not `Send`) and its caches, off the event path.

use std::{io, sync::mpsc, thread};

use super::{
    output::Output,
    render::{Format, Report, Style, Target},
    snapshot::Snapshot,
};
use crate::{proc::maps::ProcMaps, stacks::symbolize::StackSymbolizer};

enum Message {
    Snapshot(Snapshot),
    /// A newer memory map of the target (spawn mode: read just after `exec`).
    Maps(ProcMaps),
    /// Everything is queued: write what is and end, whatever other senders (a maps updater)
    /// are still alive.
    Finish,
}

pub struct Reporter {
    tx: mpsc::Sender<Message>,
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
        let (tx, rx) = mpsc::channel::<Message>();
        let handle = thread::Builder::new()
            .name("reporter".into())
            .spawn(move || {
                let mut symbolizer = StackSymbolizer::new(target.pid, maps);
                let mut rendered = Vec::new();
                for message in rx {
                    let snapshot = match message {
                        Message::Snapshot(snapshot) => snapshot,
                        Message::Maps(maps) => {
                            symbolizer.set_maps(maps);
                            continue;
                        }
                        Message::Finish => break,
                    };
                    if !out.wants(snapshot.last) {
                        continue;
                    }
                    symbolizer.refresh_maps();
                    let stacks: Vec<&[u64]> =
                        snapshot.stacks.iter().map(|s| &*s.addresses).collect();
                    let frames = symbolizer.symbolize_stacks(&stacks);
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
        let _ = self.tx.send(Message::Snapshot(snapshot));
    }

    /// A handle that sends newer memory maps of the target from another thread.
    pub fn maps_updater(&self) -> MapsUpdater {
        MapsUpdater(self.tx.clone())
    }

    /// Waits until every queued report is written.
    pub fn finish(self) -> io::Result<()> {
        let _ = self.tx.send(Message::Finish);
        self.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the reporter thread panicked")))
    }
}

/// Sends the reporter a newer memory map of the target.
pub struct MapsUpdater(mpsc::Sender<Message>);

impl MapsUpdater {
    pub fn update(&self, maps: ProcMaps) {
        let _ = self.0.send(Message::Maps(maps));
    }
}
