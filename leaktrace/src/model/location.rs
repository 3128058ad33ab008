//! Where a return address lies: the module that held the code when the stack was taken, and
//! the offset in its file. Located once, when the heap model first sees a stack, so that later
//! stages need no memory map of their own, and code that replaced other code at the same
//! address (a library unloaded, another loaded there) is told apart.

/// A module (an ELF file) of the traced processes: an index into the table that
/// `target::modules::Modules` keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId(pub u32);

/// The high bits of an address that stands for a Python frame (`stacks::python` makes them):
/// kernel space, which a user return address never is, so in no mapping of the target.
pub const FRAME_TAG: u64 = 0xfffe_0000_0000_0000;
pub const TAG_MASK: u64 = 0xffff_0000_0000_0000;

/// Whether `address` stands for a Python frame.
pub fn is_python_frame(address: u64) -> bool {
    address & TAG_MASK == FRAME_TAG
}

/// A return address, and where it lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    pub address: u64,
    /// `None` for an address in no file mapping (anonymous or JIT code, garbage).
    pub module: Option<ModuleId>,
    /// The offset of `address` in the module's file; `address` itself when there is no module.
    pub offset: u64,
}

impl Location {
    /// An address in no module.
    pub fn unknown(address: u64) -> Self {
        Self {
            address,
            module: None,
            offset: address,
        }
    }
}

/// Where code addresses lie: the traced process's address space.
pub trait Locate {
    /// How many times code was unmapped: an address located before may hold other code since.
    fn code_unmapped(&self) -> u64;

    /// Where `address` lies, for an event at `at_ns` (`CLOCK_MONOTONIC`).
    fn locate(&mut self, address: u64, at_ns: u64) -> Location;
}

/// No module anywhere: every address is [`Location::unknown`] (tests and benchmarks of the
/// heap model alone).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoModules;

impl Locate for NoModules {
    fn code_unmapped(&self) -> u64 {
        0
    }

    fn locate(&mut self, address: u64, _at_ns: u64) -> Location {
        Location::unknown(address)
    }
}
