//! KMIP's TTLV encoding as a tree: an item is a tag and a value, a structure's value is a
//! list of items. The primitives (tags, types, lengths, each value's bytes and padding) are
//! `kmip-ttlv`'s; the tree over them is here, because the KMIP operations encimg needs
//! (Encrypt and Decrypt with AES-GCM, KMIP 1.4) are not among `kmip-protocol`'s types.

use std::io::{Cursor, Read};

use kmip_ttlv::types::{
    SerializableTtlvType, TtlvBigInteger, TtlvBoolean, TtlvByteString, TtlvDateTime,
    TtlvEnumeration, TtlvInteger, TtlvLongInteger, TtlvTag, TtlvTextString,
};

/// The deepest structure nesting accepted from a server.
const MAX_DEPTH: usize = 16;

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Structure(Vec<Item>),
    Integer(i32),
    LongInteger(i64),
    BigInteger(Vec<u8>),
    Enumeration(u32),
    Boolean(bool),
    Text(String),
    Bytes(Vec<u8>),
    DateTime(i64),
    Interval(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub tag: u32,
    pub value: Value,
}

/// Messages carry data keys (Encrypt's data, Decrypt's answer): wiped when dropped.
impl Drop for Value {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        match self {
            Value::Bytes(b) | Value::BigInteger(b) => b.zeroize(),
            Value::Text(t) => t.zeroize(),
            _ => {}
        }
    }
}

pub fn structure(tag: u32, items: Vec<Item>) -> Item {
    Item {
        tag,
        value: Value::Structure(items),
    }
}
pub fn enumeration(tag: u32, v: u32) -> Item {
    Item {
        tag,
        value: Value::Enumeration(v),
    }
}
pub fn integer(tag: u32, v: i32) -> Item {
    Item {
        tag,
        value: Value::Integer(v),
    }
}
pub fn text(tag: u32, v: &str) -> Item {
    Item {
        tag,
        value: Value::Text(v.to_string()),
    }
}
pub fn bytes(tag: u32, v: &[u8]) -> Item {
    Item {
        tag,
        value: Value::Bytes(v.to_vec()),
    }
}

/// Why bytes are not a TTLV item.
#[derive(Debug)]
pub struct Malformed(pub String);

impl Item {
    /// The first child with `tag` (of a structure).
    pub fn child(&self, tag: u32) -> Option<&Item> {
        match &self.value {
            Value::Structure(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    /// Follow a path of tags through nested structures.
    #[cfg(test)]
    pub fn path(&self, tags: &[u32]) -> Option<&Item> {
        tags.iter().try_fold(self, |it, t| it.child(*t))
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_enum(&self) -> Option<u32> {
        match &self.value {
            Value::Enumeration(v) => Some(*v),
            _ => None,
        }
    }

    /// The item's bytes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail.
        let tag = TtlvTag::from(<[u8; 3]>::try_from(&self.tag.to_be_bytes()[1..]).unwrap());
        tag.write(out).unwrap();
        match &self.value {
            Value::Structure(items) => {
                out.push(0x01);
                let len_at = out.len();
                out.extend_from_slice(&[0; 4]);
                for i in items {
                    i.write(out);
                }
                let len = (out.len() - len_at - 4) as u32;
                out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
            }
            Value::Integer(v) => TtlvInteger(*v).write(out).unwrap(),
            Value::LongInteger(v) => TtlvLongInteger(*v).write(out).unwrap(),
            Value::BigInteger(v) => TtlvBigInteger(v.clone()).write(out).unwrap(),
            Value::Enumeration(v) => TtlvEnumeration(*v).write(out).unwrap(),
            Value::Boolean(v) => TtlvBoolean(*v).write(out).unwrap(),
            Value::Text(v) => TtlvTextString(v.clone()).write(out).unwrap(),
            Value::Bytes(v) => TtlvByteString(v.clone()).write(out).unwrap(),
            Value::DateTime(v) => TtlvDateTime(*v).write(out).unwrap(),
            Value::Interval(v) => {
                // Not among kmip-ttlv's types: type 0x0A, length 4, value, 4 bytes of padding.
                out.push(0x0A);
                out.extend_from_slice(&4u32.to_be_bytes());
                out.extend_from_slice(&v.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
            }
        }
    }

    /// Parse exactly one item from `buf`.
    pub fn decode(buf: &[u8]) -> Result<Item, Malformed> {
        let mut c = Cursor::new(buf);
        let item = read_item(&mut c, 0)?;
        if c.position() as usize != buf.len() {
            return Err(Malformed("trailing bytes after the message".into()));
        }
        Ok(item)
    }
}

fn bad<E: std::fmt::Debug>(e: E) -> Malformed {
    Malformed(format!("{e:?}"))
}

fn read_item(c: &mut Cursor<&[u8]>, depth: usize) -> Result<Item, Malformed> {
    if depth > MAX_DEPTH {
        return Err(Malformed("structures nested too deep".into()));
    }
    let tag = *TtlvTag::read(c).map_err(bad)?;
    let mut ty = [0u8; 1];
    c.read_exact(&mut ty).map_err(bad)?;
    // A variable length is checked against what is left before kmip-ttlv allocates it.
    if matches!(ty[0], 0x04 | 0x07 | 0x08) {
        let at = c.position() as usize;
        let buf = *c.get_ref();
        let len = buf
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
            .ok_or_else(|| Malformed("a length runs past the message".into()))?;
        if len > buf.len() - at - 4 {
            return Err(Malformed(format!(
                "a {len}-byte value runs past the message"
            )));
        }
    }
    let value = match ty[0] {
        0x01 => {
            let mut len = [0u8; 4];
            c.read_exact(&mut len).map_err(bad)?;
            let len = u32::from_be_bytes(len) as u64;
            let end = c.position() + len;
            if end > c.get_ref().len() as u64 {
                return Err(Malformed("a structure runs past the message".into()));
            }
            let mut items = Vec::new();
            while c.position() < end {
                items.push(read_item(c, depth + 1)?);
            }
            if c.position() != end {
                return Err(Malformed("a structure's length is wrong".into()));
            }
            Value::Structure(items)
        }
        0x02 => Value::Integer(*TtlvInteger::read(c).map_err(bad)?),
        0x03 => Value::LongInteger(*TtlvLongInteger::read(c).map_err(bad)?),
        0x04 => Value::BigInteger(TtlvBigInteger::read(c).map_err(bad)?.0),
        0x05 => Value::Enumeration(*TtlvEnumeration::read(c).map_err(bad)?),
        0x06 => Value::Boolean(*TtlvBoolean::read(c).map_err(bad)?),
        0x07 => Value::Text(TtlvTextString::read(c).map_err(bad)?.0),
        0x08 => Value::Bytes(TtlvByteString::read(c).map_err(bad)?.0),
        0x09 => Value::DateTime(*TtlvDateTime::read(c).map_err(bad)?),
        0x0A => {
            let mut b = [0u8; 12];
            c.read_exact(&mut b).map_err(bad)?;
            if b[..4] != 4u32.to_be_bytes() {
                return Err(Malformed("an interval's length is not 4".into()));
            }
            Value::Interval(u32::from_be_bytes(b[4..8].try_into().unwrap()))
        }
        t => return Err(Malformed(format!("unknown item type {t:#04x}"))),
    };
    Ok(Item { tag, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KMIP 1.0 use cases, 3.1.2 step 2 (docs.oasis-open.org/kmip/usecases/v1.0): the Create
    /// request of a symmetric key (with a Name attribute) and the server's response.
    const CREATE_REQUEST: &str = concat!(
        "42007801000001504200770100000038420069010000002042006A0200000004000000010000000042006B02000000040",
        "00000000000000042000D0200000004000000010000000042000F010000010842005C0500000004000000010000000042",
        "007901000000F04200570500000004000000020000000042009101000000D842005301000000284200550700000009546",
        "56D706C617465310000000000000042005405000000040000000100000000420008010000003042000A07000000174372",
        "7970746F6772617068696320416C676F726974686D0042000B05000000040000000300000000420008010000003042000",
        "A070000001443727970746F67726170686963204C656E6774680000000042000B02000000040000008000000000420008",
        "010000003042000A070000001843727970746F67726170686963205573616765204D61736B42000B02000000040000000",
        "C00000000",
    );
    const CREATE_RESPONSE: &str = concat!(
        "42007B01000000C042007A0100000048420069010000002042006A0200000004000000010000000042006B02000000040",
        "0000000000000004200920900000008000000004AFBE7C542000D0200000004000000010000000042000F010000006842",
        "005C0500000004000000010000000042007F0500000004000000000000000042007C01000000404200570500000004000",
        "0000200000000420094070000002436316231303631342D643862352D343666392D386431372D32666136656131643734",
        "376100000000",
    );

    #[test]
    fn round_trips_published_kmip_messages() {
        let raw = hex_decode(CREATE_REQUEST);
        let item = Item::decode(&raw).expect("decodes");
        assert_eq!(item.tag, 0x420078);
        let op = item.path(&[0x42000F, 0x42005C]).unwrap();
        assert_eq!(op.as_enum(), Some(1)); // Create
        let attrs = match &item.path(&[0x42000F, 0x420079, 0x420091]).unwrap().value {
            Value::Structure(a) => a.clone(),
            v => panic!("{v:?}"),
        };
        assert_eq!(
            attrs[3].child(0x42000A).unwrap().as_text(),
            Some("Cryptographic Usage Mask")
        );
        assert_eq!(item.encode(), raw, "re-encodes to the same bytes");

        let raw = hex_decode(CREATE_RESPONSE);
        let item = Item::decode(&raw).expect("decodes");
        assert_eq!(
            item.path(&[0x42007A, 0x420092]).unwrap().value,
            Value::DateTime(0x4AFBE7C5)
        );
        assert_eq!(
            item.path(&[0x42000F, 0x42007C, 0x420094])
                .unwrap()
                .as_text(),
            Some("61b10614-d8b5-46f9-8d17-2fa6ea1d747a")
        );
        assert_eq!(item.encode(), raw);
    }

    #[test]
    fn refuses_what_is_not_ttlv() {
        let ok = structure(0x420078, vec![text(0x420055, "abc"), integer(0x42000D, 1)]).encode();
        assert!(Item::decode(&ok).is_ok());
        assert!(Item::decode(&ok[..ok.len() - 1]).is_err(), "truncated");
        let mut long = ok.clone();
        long.push(0);
        assert!(Item::decode(&long).is_err(), "trailing byte");
        let mut lying = ok.clone();
        lying[7] = lying[7].wrapping_add(8);
        assert!(
            Item::decode(&lying).is_err(),
            "structure length past the end"
        );
        // A byte string claiming 4 GiB in a 24-byte message: refused before allocating.
        let mut huge = bytes(0x4200C2, b"12345678").encode();
        huge[4..8].copy_from_slice(&0xFFFF_FFF8u32.to_be_bytes());
        assert!(Item::decode(&huge).is_err(), "oversized length");
        let mut deep = text(0x420055, "x");
        for _ in 0..40 {
            deep = structure(0x420078, vec![deep]);
        }
        assert!(Item::decode(&deep.encode()).is_err(), "too deep");
    }

    fn hex_decode(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
