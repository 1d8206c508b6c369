//! A minimal reader of kernel BTF (/sys/kernel/btf/vmlinux): enough to find a struct and
//! the byte offset of a (possibly nested) member, so that the eBPF programs can read
//! kernel structs at offsets resolved on *this* kernel rather than baked in at build
//! time (rustc emits no CO-RE relocations). aya-obj parses BTF too but keeps member
//! data private.
//!
//! Format: include/uapi/linux/btf.h. A header, then a type section of variable-size
//! records (type ids start at 1), then a string section.

use std::collections::HashMap;

use anyhow::{anyhow, bail, Context as _, Result};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    /// Offset in bits.
    bit_offset: u32,
}

#[derive(Clone, Debug)]
struct Type {
    kind: u32,
    name: String,
    /// For modifiers and typedefs: the referenced type.
    target: u32,
    /// For structs and unions.
    members: Vec<Member>,
}

/// Parsed BTF: every type, struct names to ids, and enumerators (flag values such as
/// `I_LINKABLE` that became enum members in 6.13 and moved since).
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
    enumerators: HashMap<String, i64>,
}

fn u16_at(d: &[u8], o: usize) -> Result<u16> {
    Ok(u16::from_le_bytes(
        d.get(o..o + 2)
            .ok_or_else(|| anyhow!("BTF truncated"))?
            .try_into()?,
    ))
}

fn u32_at(d: &[u8], o: usize) -> Result<u32> {
    Ok(u32::from_le_bytes(
        d.get(o..o + 4)
            .ok_or_else(|| anyhow!("BTF truncated"))?
            .try_into()?,
    ))
}

impl Btf {
    pub fn from_sys_fs() -> Result<Btf> {
        let data =
            std::fs::read("/sys/kernel/btf/vmlinux").context("reading /sys/kernel/btf/vmlinux")?;
        Btf::parse(&data)
    }

    pub fn parse(d: &[u8]) -> Result<Btf> {
        if u16_at(d, 0)? != MAGIC {
            bail!("not BTF (bad magic)");
        }
        let hdr_len = u32_at(d, 4)? as usize;
        let type_off = hdr_len + u32_at(d, 8)? as usize;
        let type_len = u32_at(d, 12)? as usize;
        let str_off = hdr_len + u32_at(d, 16)? as usize;
        let str_len = u32_at(d, 20)? as usize;
        let strings = d
            .get(str_off..str_off + str_len)
            .ok_or_else(|| anyhow!("BTF strings truncated"))?;
        let name = |off: u32| -> String {
            let s = &strings[(off as usize).min(strings.len())..];
            let end = s.iter().position(|&b| b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        // Type id 0 is "void".
        let mut types = vec![Type {
            kind: 0,
            name: String::new(),
            target: 0,
            members: Vec::new(),
        }];
        let mut structs = HashMap::new();
        let mut enumerators = HashMap::new();
        let mut o = type_off;
        let end = type_off + type_len;
        while o < end {
            let name_off = u32_at(d, o)?;
            let info = u32_at(d, o + 4)?;
            let size_or_type = u32_at(d, o + 8)?;
            o += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut t = Type {
                kind,
                name: name(name_off),
                target: size_or_type,
                members: Vec::new(),
            };
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => o += 4,
                KIND_ARRAY => o += 12,
                KIND_STRUCT | KIND_UNION => {
                    for i in 0..vlen {
                        let m = o + i * 12;
                        let raw = u32_at(d, m + 8)?;
                        t.members.push(Member {
                            name: name(u32_at(d, m)?),
                            type_id: u32_at(d, m + 4)?,
                            bit_offset: if kind_flag { raw & 0xff_ffff } else { raw },
                        });
                    }
                    o += vlen * 12;
                }
                KIND_ENUM => {
                    for i in 0..vlen {
                        let m = o + i * 8;
                        let val = u32_at(d, m + 4)?;
                        // kind_flag: signed values.
                        let val = if kind_flag {
                            i64::from(val as i32)
                        } else {
                            i64::from(val)
                        };
                        enumerators.insert(name(u32_at(d, m)?), val);
                    }
                    o += vlen * 8;
                }
                KIND_ENUM64 => {
                    for i in 0..vlen {
                        let m = o + i * 12;
                        let lo = u64::from(u32_at(d, m + 4)?);
                        let hi = u64::from(u32_at(d, m + 8)?);
                        enumerators.insert(name(u32_at(d, m)?), (hi << 32 | lo) as i64);
                    }
                    o += vlen * 12;
                }
                KIND_FUNC_PROTO => o += vlen * 8,
                KIND_DATASEC => o += vlen * 12,
                _ => {}
            }
            if kind == KIND_STRUCT && !t.name.is_empty() {
                structs.entry(t.name.clone()).or_insert(types.len() as u32);
            }
            types.push(t);
        }
        Ok(Btf {
            types,
            structs,
            enumerators,
        })
    }

    /// The value of enumerator `name` (of any enum), if this kernel's BTF has it.
    pub fn enumerator(&self, name: &str) -> Option<i64> {
        self.enumerators.get(name).copied()
    }

    pub fn has_struct(&self, name: &str) -> bool {
        self.structs.contains_key(name)
    }

    /// Skips typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<&Type> {
        for _ in 0..32 {
            let t = self
                .types
                .get(id as usize)
                .ok_or_else(|| anyhow!("BTF type {id} missing"))?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.target;
                }
                _ => return Ok(t),
            }
        }
        bail!("BTF type chain too long at {id}")
    }

    /// Finds `name` in a struct/union, looking through anonymous members; returns
    /// (bit offset, member type id).
    fn member(&self, t: &Type, name: &str) -> Option<(u32, u32)> {
        for m in &t.members {
            if m.name == name {
                return Some((m.bit_offset, m.type_id));
            }
            if m.name.is_empty() {
                let inner = self.resolve(m.type_id).ok()?;
                if let Some((off, ty)) = self.member(inner, name) {
                    return Some((m.bit_offset + off, ty));
                }
            }
        }
        None
    }

    /// Whether member `path` of struct `strukt` is a pointer (struct members that
    /// became pointers between kernels, e.g. `file.f_owner` in 6.12).
    pub fn is_pointer(&self, strukt: &str, path: &str) -> Result<bool> {
        Ok(self.walk(strukt, path)?.1.kind == KIND_PTR)
    }

    /// Whether struct `strukt` has a member `path`.
    pub fn has_member(&self, strukt: &str, path: &str) -> bool {
        self.walk(strukt, path).is_ok()
    }

    /// Byte offset of `path` ("c.flc_flags") inside struct `strukt`.
    pub fn offset_of(&self, strukt: &str, path: &str) -> Result<u32> {
        let (bits, _) = self.walk(strukt, path)?;
        if !bits.is_multiple_of(8) {
            bail!("{strukt}.{path} is a bitfield");
        }
        Ok(bits / 8)
    }

    /// Follows `path` from struct `strukt`: (bit offset, the member's type).
    fn walk(&self, strukt: &str, path: &str) -> Result<(u32, &Type)> {
        let id = *self
            .structs
            .get(strukt)
            .ok_or_else(|| anyhow!("struct {strukt} not in BTF"))?;
        let mut t = self.resolve(id)?;
        let mut bits = 0u32;
        for part in path.split('.') {
            let (off, ty) = self
                .member(t, part)
                .ok_or_else(|| anyhow!("struct {strukt} has no member {path}"))?;
            bits += off;
            t = self.resolve(ty)?;
        }
        Ok((bits, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a BTF blob: struct inner { int a; char b; }; struct outer { long x; struct inner in; };
    /// plus a typedef and an anonymous union member.
    fn blob() -> Vec<u8> {
        let strings =
            b"\0int\0inner\0a\0b\0outer\0x\0in\0inner_t\0u\0y\0state\0I_LINKABLE\0".to_vec();
        let off = |s: &str| -> u32 {
            let pos = strings
                .windows(s.len() + 1)
                .position(|w| &w[..s.len()] == s.as_bytes() && w[s.len()] == 0);
            pos.unwrap() as u32
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int
        push(off("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: struct inner { a: int @0, b: int @32 }
        push(off("inner"));
        push(KIND_STRUCT << 24 | 2);
        push(8);
        push(off("a"));
        push(1);
        push(0);
        push(off("b"));
        push(1);
        push(32);
        // 3: typedef inner_t -> 2
        push(off("inner_t"));
        push(KIND_TYPEDEF << 24);
        push(2);
        // 4: anonymous union { y: int @0 }
        push(0);
        push(KIND_UNION << 24 | 1);
        push(4);
        push(off("y"));
        push(1);
        push(0);
        // 5: struct outer { x: int @0, in: inner_t @64, <anon union> @128 }
        push(off("outer"));
        push(KIND_STRUCT << 24 | 3);
        push(24);
        push(off("x"));
        push(1);
        push(0);
        push(off("in"));
        push(3);
        push(64);
        push(0);
        push(4);
        push(128);
        // 6: enum state { I_LINKABLE = 1 << 7 }
        push(off("state"));
        push(KIND_ENUM << 24 | 1);
        push(4);
        push(off("I_LINKABLE"));
        push(1 << 7);
        let mut d = Vec::new();
        d.extend_from_slice(&MAGIC.to_le_bytes());
        d.push(1);
        d.push(0);
        for v in [
            24u32,
            0,
            t.len() as u32,
            t.len() as u32,
            strings.len() as u32,
        ] {
            d.extend_from_slice(&v.to_le_bytes());
        }
        d.extend_from_slice(&t);
        d.extend_from_slice(&strings);
        d
    }

    #[test]
    fn nested_typedef_and_anonymous_members() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.offset_of("outer", "x").unwrap(), 0);
        assert_eq!(btf.offset_of("outer", "in.b").unwrap(), 12);
        assert_eq!(btf.offset_of("outer", "y").unwrap(), 16);
        assert!(btf.offset_of("outer", "nope").is_err());
        assert!(btf.offset_of("missing", "x").is_err());
        assert_eq!(btf.enumerator("I_LINKABLE"), Some(1 << 7));
        assert_eq!(btf.enumerator("I_NOPE"), None);
    }

    #[test]
    fn rejects_non_btf() {
        assert!(Btf::parse(b"\x00\x01garbage-garbage-garbage").is_err());
    }
}
