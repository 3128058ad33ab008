//! The distinct call stacks of a trace, interned: each gets a [`StackId`].

use super::{HashMap, event::Backing};

/// Index of a distinct call stack in [`Stacks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// What kind of memory a stack holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Blocks of the malloc family.
    Heap,
    /// Anonymous mappings (mmap, mremap).
    Mapping,
    /// Mappings of files: reported apart, never added to heap numbers.
    FileMapping,
}

impl Origin {
    const ALL: usize = 3;

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Heap => "malloc",
            Origin::Mapping => "mmap",
            Origin::FileMapping => "mmap_file",
        }
    }
}

impl From<Backing> for Origin {
    fn from(backing: Backing) -> Self {
        match backing {
            Backing::Anonymous => Origin::Mapping,
            Backing::File => Origin::FileMapping,
        }
    }
}

/// A distinct call stack: return addresses, innermost first.
#[derive(Debug, PartialEq, Eq)]
pub struct Stack {
    pub frames: Box<[u64]>,
    /// The capture hit its depth limit: outer frames are missing.
    pub truncated: bool,
    pub origin: Origin,
}

/// Interns stacks, comparing every frame: two different stacks never share an id.
#[derive(Debug, Default)]
pub struct Stacks {
    /// One table per origin, so that a lookup borrows the frames without allocating.
    ids: [HashMap<Box<[u64]>, StackId>; Origin::ALL],
    stacks: Vec<Stack>,
}

impl Stacks {
    /// Truncation is not part of the identity: the kept frames are what tells stacks apart.
    /// The same frames may come once cut from a deeper stack and once whole (the unwinder can
    /// stop early, at code without frame pointers); then the stack shows as truncated, since
    /// some of its allocations came from deeper. The origin is part of it: an mremap call site
    /// can move both anonymous and file mappings.
    pub fn intern(&mut self, frames: &[u64], truncated: bool, origin: Origin) -> StackId {
        let ids = &mut self.ids[origin as usize];
        if let Some(&id) = ids.get(frames) {
            self.stacks[id.0 as usize].truncated |= truncated;
            return id;
        }
        let id =
            StackId(u32::try_from(self.stacks.len()).expect("fewer than 2^32 distinct stacks"));
        self.stacks.push(Stack {
            frames: frames.into(),
            truncated,
            origin,
        });
        ids.insert(frames.into(), id);
        id
    }

    pub fn get(&self, id: StackId) -> &Stack {
        &self.stacks[id.0 as usize]
    }
}
