//! A bounds check of an ELF shared object before `dlopen` sees it.
//!
//! `dlopen` of a truncated file (a `cp` still in progress, a failed upload)
//! does not fail cleanly: it maps the file and the process dies with SIGBUS
//! inside the loader. So before opening a handler copy we check that it is a
//! shared object for this machine and that every loadable segment, the
//! program header table and the section header table lie inside the file.
//! This is all we need from ELF, so it is written here rather than pulling in
//! a general ELF parser.

/// Checks `bytes` is a complete ELF64 little-endian shared object for this
/// machine. Returns a reason a human can act on.
pub fn check(bytes: &[u8]) -> Result<(), String> {
    const EHDR_LEN: usize = 64;
    if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
        return Err("no ELF magic (this is not a shared library; is it a script, an archive or an empty file?)".into());
    }
    if bytes.len() < EHDR_LEN {
        return Err(format!(
            "ELF header truncated: file is {} bytes",
            bytes.len()
        ));
    }
    if bytes[4] != 2 {
        return Err("not a 64-bit ELF file".into());
    }
    if bytes[5] != 1 {
        return Err("not a little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));

    let e_type = u16_at(16);
    if e_type != 3 {
        return Err(format!(
            "ELF type is {e_type}, not a shared object (3); build the handler as a cdylib"
        ));
    }
    let machine = u16_at(18);
    if let Some(expected) = host_machine()
        && machine != expected
    {
        return Err(format!(
            "built for ELF machine {machine}, this server runs on machine {expected}; rebuild for this architecture"
        ));
    }
    let len = bytes.len() as u64;
    let phoff = u64_at(32);
    let shoff = u64_at(40);
    let phentsize = u16_at(54) as u64;
    let phnum = u16_at(56) as u64;
    let shentsize = u16_at(58) as u64;
    let shnum = u16_at(60) as u64;

    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if phentsize < 56 || ph_end > len {
        return Err(format!(
            "truncated: program headers end at {ph_end} but the file is {len} bytes (was it still being written?)"
        ));
    }
    for i in 0..phnum {
        let o = (phoff + i * phentsize) as usize;
        let p_type = u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        const PT_LOAD: u32 = 1;
        if p_type != PT_LOAD {
            continue;
        }
        let p_offset = u64_at(o + 8);
        let p_filesz = u64_at(o + 32);
        let end = p_offset.saturating_add(p_filesz);
        if end > len {
            return Err(format!(
                "truncated: PT_LOAD segment ends at {end} but the file is {len} bytes (was it still being written?)"
            ));
        }
    }
    if shoff != 0 {
        let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
        if sh_end > len {
            return Err(format!(
                "truncated: section headers end at {sh_end} but the file is {len} bytes (was it still being written?)"
            ));
        }
    }
    Ok(())
}

/// The ELF `e_machine` of the running binary, where we know it.
fn host_machine() -> Option<u16> {
    if cfg!(target_arch = "x86_64") {
        Some(62)
    } else if cfg!(target_arch = "aarch64") {
        Some(183)
    } else if cfg!(target_arch = "riscv64") {
        Some(243)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_binary() -> Vec<u8> {
        // The test binary is a PIE executable (type 3 on most toolchains) or
        // an executable (type 2); either way its segments are whole.
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn rejects_non_elf_and_truncated() {
        assert!(check(b"").unwrap_err().contains("no ELF magic"));
        assert!(check(b"#!/bin/sh\n").unwrap_err().contains("no ELF magic"));
        let bin = own_binary();
        let e_type = u16::from_le_bytes([bin[16], bin[17]]);
        if e_type == 3 {
            assert_eq!(check(&bin), Ok(()));
        }
        for cut in [40, 64, 200, bin.len() / 3, bin.len() - 1] {
            let mut t = bin[..cut].to_vec();
            t[16] = 3; // pretend it is a shared object so the bounds are checked
            if let Some(b) = t.get_mut(17) {
                *b = 0;
            }
            assert!(check(&t).is_err(), "a {cut}-byte prefix passed");
        }
    }
}
