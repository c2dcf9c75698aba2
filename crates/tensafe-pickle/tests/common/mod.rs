//! Test-side builders: a pickle assembler and a zip writer that can produce
//! torch-style archives and every zip trick the reader must refuse. The
//! payloads are inert: nothing here (or in the library) ever executes them.

#![allow(dead_code)]

use std::path::Path;

/// A pickle assembler: opcodes in, bytes out.
#[derive(Clone, Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn new() -> Asm {
        Asm(Vec::new())
    }
    pub fn proto(self, v: u8) -> Asm {
        self.raw(&[0x80, v])
    }
    pub fn op(mut self, b: u8) -> Asm {
        self.0.push(b);
        self
    }
    pub fn raw(mut self, b: &[u8]) -> Asm {
        self.0.extend_from_slice(b);
        self
    }
    /// GLOBAL (protocol 0 text form).
    pub fn global(self, module: &str, name: &str) -> Asm {
        self.op(b'c').raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
    }
    /// INST with the items since the last MARK.
    pub fn inst(self, module: &str, name: &str) -> Asm {
        self.op(b'i').raw(module.as_bytes()).raw(b"\n").raw(name.as_bytes()).raw(b"\n")
    }
    /// BINUNICODE.
    pub fn str(self, s: &str) -> Asm {
        self.op(b'X').raw(&(s.len() as u32).to_le_bytes()).raw(s.as_bytes())
    }
    /// SHORT_BINUNICODE.
    pub fn short_str(self, s: &str) -> Asm {
        self.op(0x8c).raw(&[s.len() as u8]).raw(s.as_bytes())
    }
    pub fn int(self, i: i64) -> Asm {
        if (0..256).contains(&i) {
            self.op(b'K').raw(&[i as u8])
        } else if (0..65536).contains(&i) {
            self.op(b'M').raw(&(i as u16).to_le_bytes())
        } else if i32::try_from(i).is_ok() {
            self.op(b'J').raw(&(i as i32).to_le_bytes())
        } else {
            self.op(0x8a).raw(&[8]).raw(&i.to_le_bytes())
        }
    }
    pub fn mark(self) -> Asm {
        self.op(b'(')
    }
    pub fn tuple(self) -> Asm {
        self.op(b't')
    }
    pub fn tuple1(self) -> Asm {
        self.op(0x85)
    }
    pub fn tuple2(self) -> Asm {
        self.op(0x86)
    }
    pub fn empty_tuple(self) -> Asm {
        self.op(b')')
    }
    pub fn empty_dict(self) -> Asm {
        self.op(b'}')
    }
    pub fn empty_list(self) -> Asm {
        self.op(b']')
    }
    pub fn reduce(self) -> Asm {
        self.op(b'R')
    }
    pub fn build(self) -> Asm {
        self.op(b'b')
    }
    pub fn setitem(self) -> Asm {
        self.op(b's')
    }
    pub fn setitems(self) -> Asm {
        self.op(b'u')
    }
    pub fn append(self) -> Asm {
        self.op(b'a')
    }
    pub fn stop(self) -> Asm {
        self.op(b'.')
    }
    pub fn pop(self) -> Asm {
        self.op(b'0')
    }
    pub fn none(self) -> Asm {
        self.op(b'N')
    }
    pub fn newfalse(self) -> Asm {
        self.op(0x89)
    }
    pub fn binput(self, i: u8) -> Asm {
        self.op(b'q').raw(&[i])
    }
    pub fn binget(self, i: u8) -> Asm {
        self.op(b'h').raw(&[i])
    }
    pub fn memoize(self) -> Asm {
        self.op(0x94)
    }
    pub fn stack_global(self) -> Asm {
        self.op(0x93)
    }
    pub fn frame(self, len: u64) -> Asm {
        self.op(0x95).raw(&len.to_le_bytes())
    }
    pub fn binpersid(self) -> Asm {
        self.op(b'Q')
    }
    pub fn ints_tuple(mut self, v: &[i64]) -> Asm {
        self = self.mark();
        for &i in v {
            self = self.int(i);
        }
        self.tuple()
    }
    /// `('storage', torch.<stype>, key, 'cpu', numel)` + BINPERSID.
    pub fn storage(self, stype: &str, key: &str, numel: i64) -> Asm {
        self.mark().str("storage").global("torch", stype).str(key).str("cpu").int(numel).tuple().binpersid()
    }
    /// `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`.
    pub fn tensor_v2(self, stype: &str, key: &str, numel: i64, offset: i64, size: &[i64], stride: &[i64]) -> Asm {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .mark()
            .storage(stype, key, numel)
            .int(offset)
            .ints_tuple(size)
            .ints_tuple(stride)
            .newfalse()
            .global("collections", "OrderedDict")
            .empty_tuple()
            .reduce()
            .tuple()
            .reduce()
    }
    /// The inert payload: `posix.system("touch <marker>")`, left on the stack.
    pub fn system_call(self, marker: &Path) -> Asm {
        self.global("posix", "system").str(&format!("touch {}", marker.display())).tuple1().reduce()
    }
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// A protocol-2 state dict `{'w': float32 tensor (3, 4) in storage '0'}`,
/// like `torch.save` writes it (without the memo).
pub fn state_dict_pickle() -> Vec<u8> {
    Asm::new()
        .proto(2)
        .global("collections", "OrderedDict")
        .empty_tuple()
        .reduce()
        .mark()
        .str("w")
        .tensor_v2("FloatStorage", "0", 12, 0, &[3, 4], &[4, 1])
        .setitems()
        .stop()
        .finish()
}

/// 12 float32 values 0..12.
pub fn floats12() -> Vec<u8> {
    (0..12).flat_map(|i| (i as f32).to_le_bytes()).collect()
}

/// One zip entry.
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub data: Vec<u8>,
    /// 0 stored, 8 deflate, anything else written as given.
    pub method: u16,
    pub flags: u16,
    /// Override the CRC written (else computed).
    pub crc: Option<u32>,
    /// Name in the local header when it differs.
    pub local_name: Option<String>,
    /// Override the uncompressed size in the central directory.
    pub declared_size: Option<u32>,
}

impl Entry {
    pub fn new(name: &str, data: &[u8]) -> Entry {
        Entry { name: name.into(), data: data.to_vec(), method: 0, flags: 0, crc: None, local_name: None, declared_size: None }
    }
}

/// A zip writer with knobs for the tricks.
#[derive(Clone, Default)]
pub struct Zip {
    pub entries: Vec<Entry>,
    /// Bytes before the first local header.
    pub before: Vec<u8>,
    /// Archive comment.
    pub comment: Vec<u8>,
    /// Make the second entry's local header offset point at the first's data.
    pub overlap: bool,
    /// Write a second (fake) end record inside the comment region.
    pub second_eocd: bool,
    /// Bytes hidden after the first entry's data.
    pub gap: Vec<u8>,
}

impl Zip {
    pub fn new(entries: Vec<Entry>) -> Zip {
        Zip { entries, ..Default::default() }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = self.before.clone();
        let mut central = Vec::new();
        let mut offsets = Vec::new();
        for e in &self.entries {
            let payload = match e.method {
                8 => miniz_oxide::deflate::compress_to_vec(&e.data, 6),
                _ => e.data.clone(),
            };
            let crc = e.crc.unwrap_or_else(|| crc32fast::hash(&e.data));
            let usize_ = e.declared_size.unwrap_or(e.data.len() as u32);
            let local_name = e.local_name.clone().unwrap_or_else(|| e.name.clone());
            let offset = out.len() as u32;
            offsets.push(offset);
            out.extend_from_slice(b"PK\x03\x04");
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&e.flags.to_le_bytes());
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&crc.to_le_bytes());
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(&usize_.to_le_bytes());
            out.extend_from_slice(&(local_name.len() as u16).to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(local_name.as_bytes());
            out.extend_from_slice(&payload);
            if offsets.len() == 1 {
                out.extend_from_slice(&self.gap);
            }

            let mut c = Vec::new();
            c.extend_from_slice(b"PK\x01\x02");
            c.extend_from_slice(&20u16.to_le_bytes());
            c.extend_from_slice(&20u16.to_le_bytes());
            c.extend_from_slice(&e.flags.to_le_bytes());
            c.extend_from_slice(&e.method.to_le_bytes());
            c.extend_from_slice(&[0; 4]);
            c.extend_from_slice(&crc.to_le_bytes());
            c.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            c.extend_from_slice(&usize_.to_le_bytes());
            c.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            c.extend_from_slice(&[0; 8]); // extra, comment, disk, internal attributes
            c.extend_from_slice(&[0; 4]); // external attributes
            c.extend_from_slice(&offset.to_le_bytes());
            c.extend_from_slice(e.name.as_bytes());
            central.push(c);
        }
        if self.overlap && central.len() > 1 {
            let first = offsets[0];
            let c = &mut central[1];
            c[42..46].copy_from_slice(&first.to_le_bytes());
        }
        let cd_offset = out.len() as u32;
        for c in &central {
            out.extend_from_slice(c);
        }
        let cd_size = out.len() as u32 - cd_offset;
        let mut comment = self.comment.clone();
        if self.second_eocd {
            let mut fake = eocd(central.len() as u16, cd_size, cd_offset, 0);
            fake.extend_from_slice(&comment);
            comment = fake;
        }
        out.extend_from_slice(&eocd(central.len() as u16, cd_size, cd_offset, comment.len() as u16));
        out.extend_from_slice(&comment);
        out
    }
}

fn eocd(count: u16, cd_size: u32, cd_offset: u32, comment_len: u16) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(b"PK\x05\x06");
    e.extend_from_slice(&[0; 4]);
    e.extend_from_slice(&count.to_le_bytes());
    e.extend_from_slice(&count.to_le_bytes());
    e.extend_from_slice(&cd_size.to_le_bytes());
    e.extend_from_slice(&cd_offset.to_le_bytes());
    e.extend_from_slice(&comment_len.to_le_bytes());
    e
}

/// The entries of a torch.save archive under `prefix/`.
pub fn torch_entries(prefix: &str, data_pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<Entry> {
    let mut entries = vec![Entry::new(&format!("{prefix}/data.pkl"), data_pkl), Entry::new(&format!("{prefix}/byteorder"), b"little")];
    for (key, data) in storages {
        entries.push(Entry::new(&format!("{prefix}/data/{key}"), data));
    }
    entries.push(Entry::new(&format!("{prefix}/version"), b"3\n"));
    entries
}

/// A torch.save archive.
pub fn torch_zip(data_pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    Zip::new(torch_entries("archive", data_pkl, storages)).build()
}

/// The five pickles and raw section of a legacy stream.
pub fn legacy_stream(magic: Vec<u8>, sys_info: Vec<u8>, object: Vec<u8>, keys: Vec<u8>, raw: &[(u64, &[u8])]) -> Vec<u8> {
    let mut out = magic;
    out.extend(Asm::new().proto(2).int(1001).stop().finish());
    out.extend(sys_info);
    out.extend(object);
    out.extend(keys);
    for (numel, data) in raw {
        out.extend_from_slice(&numel.to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

pub fn legacy_magic() -> Vec<u8> {
    Asm::new().proto(2).raw(&[0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19]).stop().finish()
}

pub fn legacy_sys_info() -> Vec<u8> {
    Asm::new()
        .proto(2)
        .empty_dict()
        .mark()
        .str("protocol_version")
        .int(1001)
        .str("little_endian")
        .op(0x88)
        .str("type_sizes")
        .empty_dict()
        .mark()
        .str("short")
        .int(2)
        .str("int")
        .int(4)
        .str("long")
        .int(4)
        .setitems()
        .setitems()
        .stop()
        .finish()
}

pub fn legacy_keys(keys: &[&str]) -> Vec<u8> {
    let mut a = Asm::new().proto(2).empty_list().mark();
    for k in keys {
        a = a.str(k);
    }
    a.op(b'e').stop().finish()
}

/// `{'w': float32 (3, 4)}` with legacy 6-tuple pids on key `key`.
pub fn legacy_object(key: &str) -> Vec<u8> {
    Asm::new()
        .proto(2)
        .global("collections", "OrderedDict")
        .empty_tuple()
        .reduce()
        .mark()
        .str("w")
        .global("torch._utils", "_rebuild_tensor_v2")
        .mark()
        .mark()
        .str("storage")
        .global("torch", "FloatStorage")
        .str(key)
        .str("cpu")
        .int(12)
        .none()
        .tuple()
        .binpersid()
        .int(0)
        .ints_tuple(&[3, 4])
        .ints_tuple(&[4, 1])
        .newfalse()
        .global("collections", "OrderedDict")
        .empty_tuple()
        .reduce()
        .tuple()
        .reduce()
        .setitems()
        .stop()
        .finish()
}
