//! The little pfwd needs from the running kernel's BTF (`/sys/kernel/btf/vmlinux`, the type information the kernel
//! describes itself with): the id of a kfunc, and where a field of a kernel struct sits. A reader of the format's
//! type section (Documentation/bpf/btf.rst), not a general one: aya parses BTF too but keeps struct members private.
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

const MAGIC: u16 = 0xeb9f;

// Type kinds (`BTF_KIND_*`) this reader looks into; the others it only steps over.
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_FUNC: u32 = 12;

/// One type record: where it starts in the type section, and its header's fields.
#[derive(Clone, Copy)]
struct Type {
    at: usize,
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    /// The size (structs, unions) or the referenced type id (typedefs, modifiers, functions).
    size_or_type: u32,
}

/// The type and string sections of a BTF blob, with the start of each type record (ids start at 1).
pub struct KernelBtf {
    types: Vec<u8>,
    strings: Vec<u8>,
    index: Vec<Type>,
}

/// A field's position: its offset from the start of the struct, and its width, in bits (the width of its type
/// when it is not a bitfield: then `bits` is 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldBits {
    pub offset: u32,
    pub bits: u32,
}

impl KernelBtf {
    /// The running kernel's BTF.
    pub fn running() -> Result<Self> {
        Self::read(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&data).with_context(|| format!("parsing the BTF in {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let u32_at = |o: usize| -> Result<u32> {
            let b = data.get(o..o + 4).context("truncated header")?;
            Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        ensure!(data.len() >= 24, "too short for a BTF header");
        let magic = u16::from_le_bytes([data[0], data[1]]);
        ensure!(magic == MAGIC, "not little-endian BTF (magic {magic:#x})");
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let section = |off: usize, len: usize| {
            data.get(hdr_len + off..hdr_len + off + len).map(<[u8]>::to_vec).context("a section runs past the end")
        };
        let mut btf = Self { types: section(type_off, type_len)?, strings: section(str_off, str_len)?, index: vec![] };
        btf.index_types()?;
        Ok(btf)
    }

    fn word(&self, at: usize) -> Result<u32> {
        let b = self.types.get(at..at + 4).context("a type record runs past the type section")?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn index_types(&mut self) -> Result<()> {
        let mut at = 0;
        while at < self.types.len() {
            let info = self.word(at + 4)?;
            let t = Type {
                at,
                name_off: self.word(at)?,
                kind: (info >> 24) & 0x1f,
                vlen: (info & 0xffff) as usize,
                kind_flag: info >> 31 != 0,
                size_or_type: self.word(at + 8)?,
            };
            // What follows the 12-byte header, by kind (btf.rst, "Type Encoding").
            let extra = match t.kind {
                1 | 14 | 17 => 4,               // INT, VAR, DECL_TAG
                3 => 12,                        // ARRAY
                4 | 5 | 15 | 19 => 12 * t.vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * t.vlen,           // ENUM, FUNC_PROTO
                2 | 7..=12 | 16 | 18 => 0,      // PTR, FWD, TYPEDEF, modifiers, FUNC, FLOAT, TYPE_TAG
                k => bail!("unknown BTF kind {k} (type {})", self.index.len() + 1),
            };
            self.index.push(t);
            at += 12 + extra;
        }
        Ok(())
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self.strings.get(off as usize..).unwrap_or_default();
        &s[..s.iter().position(|&b| b == 0).unwrap_or(s.len())]
    }

    fn by_id(&self, id: u32) -> Option<Type> {
        self.index.get((id as usize).checked_sub(1)?).copied()
    }

    /// The id of the first type of `kind` named `name`.
    fn find(&self, kind: u32, name: &str) -> Option<u32> {
        let i = self.index.iter().position(|t| t.kind == kind && self.name(t.name_off) == name.as_bytes())?;
        Some(i as u32 + 1)
    }

    /// The BTF id of the kernel function `name` (a kfunc's id is what a kfunc call instruction carries).
    pub fn func_id(&self, name: &str) -> Option<u32> {
        self.find(KIND_FUNC, name)
    }

    /// Where the field `field` of `struct name` is, looking into anonymous struct and union members as C does.
    pub fn field(&self, name: &str, field: &str) -> Option<FieldBits> {
        self.field_in(self.find(KIND_STRUCT, name)?, field.as_bytes(), 0, 0)
    }

    fn field_in(&self, id: u32, field: &[u8], base: u32, depth: u32) -> Option<FieldBits> {
        let t = self.by_id(id)?;
        if depth > 8 || !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        for m in 0..t.vlen {
            let at = t.at + 12 + 12 * m;
            let (name_off, member_type, offset) =
                (self.word(at).ok()?, self.word(at + 4).ok()?, self.word(at + 8).ok()?);
            // With the kind flag, a member's offset word holds its bitfield width in the top byte.
            let (offset, bits) = if t.kind_flag { (offset & 0xff_ffff, offset >> 24) } else { (offset, 0) };
            let name = self.name(name_off);
            if name == field {
                return Some(FieldBits { offset: base + offset, bits });
            }
            if name.is_empty()
                && let Some(found) = self.field_in(self.resolved(member_type)?, field, base + offset, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }

    /// `id` with typedefs and const/volatile qualifiers looked through.
    fn resolved(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let t = self.by_id(id)?;
            if !matches!(t.kind, KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST) {
                return Some(id);
            }
            id = t.size_or_type;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_the_programs_need_in_the_running_kernel() {
        let btf = KernelBtf::running().expect("the kernel's BTF");
        // The kfunc's id, against aya's own BTF parser.
        let aya = aya_obj::btf::Btf::from_sys_fs().expect("aya parses the kernel's BTF");
        let expected = aya.id_by_type_name_kind("bpf_cast_to_kern_ctx", aya_obj::btf::BtfKind::Func).unwrap();
        assert_eq!(btf.func_id("bpf_cast_to_kern_ctx"), Some(expected));
        assert_eq!(btf.func_id("no_such_function_here"), None);
        // A plain member of sk_buff, and one of its bitfields inside an anonymous union and struct.
        let len = btf.field("sk_buff", "len").expect("sk_buff.len");
        assert_eq!((len.offset % 8, len.bits), (0, 0));
        let summed = btf.field("sk_buff", "ip_summed").expect("sk_buff.ip_summed");
        assert_eq!(summed.bits, 2, "{summed:?}");
        assert!(summed.offset > len.offset && summed.offset < 224 * 8, "{summed:?}");
        assert_eq!(btf.field("sk_buff", "no_such_field"), None);
    }

    #[test]
    fn refuses_what_is_not_btf() {
        assert!(KernelBtf::parse(&[0u8; 64]).is_err());
        assert!(KernelBtf::parse(b"short").is_err());
    }
}
