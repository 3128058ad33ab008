//! Function symbols of an ELF file, as file offsets (what uprobes attach to).

use std::{collections::HashMap, path::Path};

use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file leaktrace can read: {source}")]
    Parse { path: String, source: object::Error },
}

/// The defined function symbols of one ELF file, by name, as file offsets.
#[derive(Debug, Default)]
pub struct ElfSymbols {
    offsets: HashMap<String, u64>,
}

impl ElfSymbols {
    /// Reads the dynamic symbols and, where present, the full symbol table.
    pub fn read(path: &Path) -> Result<Self, ElfError> {
        let data = std::fs::read(path).map_err(|source| ElfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data).map_err(|source| ElfError::Parse {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn parse(data: &[u8]) -> Result<Self, object::Error> {
        let file = object::File::parse(data)?;
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .map(|s| (s.address(), s.size(), s.file_range().0))
            .collect();
        let file_offset = |addr: u64| {
            segments
                .iter()
                .find(|&&(start, size, _)| start <= addr && addr < start + size)
                .map(|&(start, _, offset)| addr - start + offset)
        };
        let mut offsets = HashMap::new();
        for symbol in file.dynamic_symbols().chain(file.symbols()) {
            if symbol.kind() != object::SymbolKind::Text
                || symbol.is_undefined()
                || symbol.address() == 0
            {
                continue;
            }
            let (Ok(name), Some(offset)) = (symbol.name(), file_offset(symbol.address())) else {
                continue;
            };
            // Versioned dynamic names come first; the first definition wins.
            offsets.entry(name.to_owned()).or_insert(offset);
        }
        Ok(Self { offsets })
    }

    pub fn file_offset(&self, name: &str) -> Option<u64> {
        self.offsets.get(name).copied()
    }
}

/// The file ranges (offset, length) of the executable segments of an ELF file: where its code is.
pub fn executable_ranges(data: &[u8]) -> Result<Vec<(u64, u64)>, object::Error> {
    const PF_X: u32 = 1;
    let file = object::File::parse(data)?;
    Ok(file
        .segments()
        .filter(
            |s| matches!(s.flags(), object::SegmentFlags::Elf { p_flags } if p_flags & PF_X != 0),
        )
        .map(|s| s.file_range())
        .filter(|&(offset, size)| size > 0 && offset.saturating_add(size) <= data.len() as u64)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf_data() {
        assert!(ElfSymbols::parse(b"").is_err());
        assert!(ElfSymbols::parse(b"\x7fELF garbage that is not an ELF header").is_err());
    }

    #[test]
    fn finds_this_binary_s_own_functions() {
        // The test binary is an ELF file with a symbol table; `main` is always there.
        let me = std::env::current_exe().unwrap();
        let symbols = ElfSymbols::read(&me).unwrap();
        assert!(symbols.file_offset("main").is_some());
        assert_eq!(symbols.file_offset("no such symbol"), None);
        // `main` is code, so it lies in an executable segment.
        let data = std::fs::read(&me).unwrap();
        let main = symbols.file_offset("main").unwrap();
        let ranges = executable_ranges(&data).unwrap();
        assert!(
            ranges.iter().any(|&(o, n)| o <= main && main < o + n),
            "{ranges:x?}"
        );
        assert!(executable_ranges(b"not elf").is_err());
    }
}
