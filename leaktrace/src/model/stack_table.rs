//! The distinct call stacks of a trace, interned: each gets a [`StackId`].

use std::sync::Arc;

use super::{
    HashMap,
    event::Backing,
    location::{Locate, Location},
};

/// Index of a distinct call stack in [`Stacks`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StackId(pub u32);

/// What kind of memory a stack holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Origin {
    /// Blocks of the malloc family.
    Malloc,
    /// Anonymous mappings (mmap, mremap).
    Mmap,
    /// Mappings of files: reported apart, never added to heap numbers.
    MmapFile,
    /// pymalloc's arenas (`Backing::PymallocArena`): reported apart, never added to heap
    /// numbers, which count the objects in them.
    PymallocArena,
}

impl Origin {
    const ALL: usize = 4;

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Malloc => "malloc",
            Origin::Mmap => "mmap",
            Origin::MmapFile => "mmap_file",
            Origin::PymallocArena => "pymalloc_arena",
        }
    }

    /// Memory reported apart from the outstanding totals (file mappings, pymalloc's arenas).
    pub fn is_apart(self) -> bool {
        matches!(self, Origin::MmapFile | Origin::PymallocArena)
    }
}

impl From<Backing> for Origin {
    fn from(backing: Backing) -> Self {
        match backing {
            Backing::Anonymous => Origin::Mmap,
            Backing::File => Origin::MmapFile,
            Backing::PymallocArena => Origin::PymallocArena,
        }
    }
}

/// A distinct call stack: return addresses, innermost first, located.
#[derive(Debug, PartialEq, Eq)]
pub struct Stack {
    /// Shared with the reports that list the stack.
    pub frames: Arc<[Location]>,
    /// The capture hit its depth limit: outer frames are missing.
    pub truncated: bool,
    pub origin: Origin,
}

impl Stack {
    pub fn addresses(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        self.frames.iter().map(|f| f.address)
    }
}

/// Interns stacks, comparing every frame: two different stacks never share an id at once. A
/// forgotten stack's id goes to the next new stack (long traces keep a bounded table).
///
/// A stack is its located frames: the same addresses hold other code once code was unmapped
/// (a library unloaded and another loaded at its address, an `exec`). Events carry addresses,
/// so they are looked up by address first, in an index that holds until code is unmapped;
/// only a stack not found there is located, and found again by its located frames.
#[derive(Debug, Default)]
pub struct Stacks {
    /// One table per origin, so that a lookup borrows the frames without allocating.
    by_address: [HashMap<Box<[u64]>, StackId>; Origin::ALL],
    /// `Locate::code_unmapped` when `by_address` was last emptied.
    code_unmapped: u64,
    by_location: [HashMap<Arc<[Location]>, StackId>; Origin::ALL],
    stacks: Vec<Stack>,
    /// Ids of forgotten stacks, free for new ones.
    vacant: Vec<StackId>,
}

impl Stacks {
    /// Truncation is not part of the identity: the kept frames are what tells stacks apart.
    /// The same frames may come once cut from a deeper stack and once whole (the unwinder can
    /// stop early, at code without frame pointers); then the stack shows as truncated, since
    /// some of its allocations came from deeper. The origin is part of it: an mremap call site
    /// can move both anonymous and file mappings. The frames of a stack not seen before are
    /// located by `code`, for an event at `at_ns`.
    pub fn intern(
        &mut self,
        frames: &[u64],
        truncated: bool,
        origin: Origin,
        at_ns: u64,
        code: &mut impl Locate,
    ) -> StackId {
        if code.code_unmapped() != self.code_unmapped {
            self.code_unmapped = code.code_unmapped();
            self.by_address.iter_mut().for_each(HashMap::clear);
        }
        let id = match self.by_address[origin as usize].get(frames) {
            Some(&id) => id,
            None => {
                let located: Arc<[Location]> =
                    frames.iter().map(|&a| code.locate(a, at_ns)).collect();
                let id = self.by_located(located, origin);
                self.by_address[origin as usize].insert(frames.into(), id);
                id
            }
        };
        self.stacks[id.0 as usize].truncated |= truncated;
        id
    }

    fn by_located(&mut self, frames: Arc<[Location]>, origin: Origin) -> StackId {
        if let Some(&id) = self.by_location[origin as usize].get(&frames) {
            return id;
        }
        let stack = Stack {
            frames: frames.clone(),
            truncated: false,
            origin,
        };
        let id = match self.vacant.pop() {
            Some(id) => {
                self.stacks[id.0 as usize] = stack;
                id
            }
            None => {
                self.stacks.push(stack);
                StackId(u32::try_from(self.stacks.len() - 1).expect("fewer than 2^32 stacks"))
            }
        };
        self.by_location[origin as usize].insert(frames, id);
        id
    }

    /// Forgets a stack that nothing refers to any more; its id goes to the next new stack.
    pub fn forget(&mut self, id: StackId) {
        let vacant = Stack {
            frames: Arc::new([]),
            truncated: false,
            origin: Origin::Malloc,
        };
        let stack = std::mem::replace(&mut self.stacks[id.0 as usize], vacant);
        let by_address = &mut self.by_address[stack.origin as usize];
        let addresses: Vec<u64> = stack.addresses().collect();
        // Since code was unmapped, the same addresses may be another stack's.
        if by_address.get(&addresses[..]) == Some(&id) {
            by_address.remove(&addresses[..]);
        }
        self.by_location[stack.origin as usize].remove(&stack.frames);
        self.vacant.push(id);
    }

    /// Stacks known now (forgotten ones not counted).
    pub fn len(&self) -> usize {
        self.stacks.len() - self.vacant.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, id: StackId) -> &Stack {
        &self.stacks[id.0 as usize]
    }
}
