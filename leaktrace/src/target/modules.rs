//! The modules (ELF files) that the traced processes map, each opened once, through the
//! target's own view of it, and known by its file identity: every process that maps the same
//! file shares one module, and a library replaced on disk is another one.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    sync::{Arc, OnceLock, RwLock},
};

use leaktrace_common::unwind_rows::UnwindRow;

use super::cfi::ModuleCfi;
use crate::{
    model::location::ModuleId,
    proc::{
        files::{self, FileId, TargetFile},
        maps::Mapping,
    },
};

/// One module.
pub struct Module {
    /// The path as the target names it (in its own mount namespace; "PATH (deleted)" for a
    /// file gone from its path).
    pub path: String,
    /// The file, open for as long as the trace runs: it is read from there whatever happens
    /// to the target, its mount namespace or the path meanwhile. `None` when it could not be
    /// opened: its frames are then module + offset.
    file: Option<File>,
    /// Parsed the first time a stack is unwound through it or frame pointers are looked for.
    cfi: OnceLock<Option<ModuleCfi>>,
    /// Its CFI as the BPF side's unwinding rows (see [`ModuleCfi::unwind_rows`]), built the
    /// first time the module is mapped where frame pointers cannot be trusted.
    unwind_rows: OnceLock<Vec<UnwindRow>>,
}

impl Module {
    /// A path that opens this module's file from this process (the descriptor leaktrace holds),
    /// for libraries that open files by path (blazesym).
    pub fn open_path(&self) -> Option<PathBuf> {
        self.file.as_ref().map(files::reopen_path)
    }

    /// Its call-frame information; `None` when its file could not be opened or parsed.
    pub fn cfi(&self) -> Option<&ModuleCfi> {
        self.cfi
            .get_or_init(|| {
                let file = self.file.as_ref()?;
                ModuleCfi::parse(&object::ReadCache::new(file)).ok()
            })
            .as_ref()
    }

    /// Its unwinding rows, at ELF virtual addresses; none without CFI.
    pub fn unwind_rows(&self) -> &[UnwindRow] {
        self.unwind_rows
            .get_or_init(|| self.cfi().map(ModuleCfi::unwind_rows).unwrap_or_default())
    }

    /// It keeps frame pointers: see [`ModuleCfi::keeps_frame_pointers`]; a module without
    /// CFI is walked by its frame pointers all the same.
    pub fn keeps_frame_pointers(&self) -> bool {
        self.cfi().is_none_or(|cfi| cfi.keeps_frame_pointers)
    }
}

/// What identifies a module.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    File(FileId),
    /// A file that could not be opened: only its path and inode tell it apart.
    Unopened {
        path: String,
        inode: u64,
    },
}

/// The modules of a trace, shared by the event loop (which adds them) and the reporter
/// threads (which symbolize with them).
#[derive(Default)]
pub struct Modules {
    inner: RwLock<Table>,
}

#[derive(Default)]
struct Table {
    modules: Vec<Arc<Module>>,
    ids: HashMap<Key, ModuleId>,
}

impl Modules {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn get(&self, id: ModuleId) -> Arc<Module> {
        let table = self.inner.read().unwrap_or_else(|e| e.into_inner());
        table.modules[id.0 as usize].clone()
    }

    /// The module of the file behind `mapping` in process `pid`: opened (see
    /// `proc::files::open`) unless a module of the same file is known already.
    pub fn of_mapping(&self, pid: u32, mapping: &Mapping) -> ModuleId {
        let opened = files::open(pid, TargetFile::Mapped(mapping))
            .and_then(|opened| Ok((opened.id()?, opened.file)));
        let (key, file) = match opened {
            Ok((id, file)) => (Key::File(id), Some(file)),
            Err(_) => (
                Key::Unopened {
                    path: mapping.path.clone(),
                    inode: mapping.inode,
                },
                None,
            ),
        };
        self.insert(key, &mapping.path, file)
    }

    /// The module of the file at `path` before any traced process maps it: spawn mode's
    /// command and the libraries its loader will load, known before its `exec` (a child of
    /// leaktrace's, in leaktrace's mount namespace). Named by its canonical path, as the
    /// kernel names the mappings of it; its mappings get this module, as the same file.
    /// `None` when it cannot be opened.
    pub fn of_path(&self, path: &Path) -> Option<Arc<Module>> {
        let path = std::fs::canonicalize(path).ok()?;
        let opened = files::open(std::process::id(), TargetFile::Path(&path)).ok()?;
        let key = Key::File(opened.id().ok()?);
        let id = self.insert(key, &path.to_string_lossy(), Some(opened.file));
        Some(self.get(id))
    }

    /// The module known by `key`, added (as `path`, read from `file`) if it is new.
    fn insert(&self, key: Key, path: &str, file: Option<File>) -> ModuleId {
        let mut table = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if let Some(&id) = table.ids.get(&key) {
            return id;
        }
        let id = ModuleId(u32::try_from(table.modules.len()).expect("fewer than 2^32 modules"));
        table.modules.push(Arc::new(Module {
            path: path.to_owned(),
            file,
            cfi: OnceLock::new(),
            unwind_rows: OnceLock::new(),
        }));
        table.ids.insert(key, id);
        id
    }
}
