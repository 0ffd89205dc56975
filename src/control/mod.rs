//! Control requests (`.control/copy`, `rekey`, `snapshot`) and the jobs that carry them out.
//! Parsing is strict and never panics; the words are the CLI's (`key=K`, `encrypt`,
//! `unencrypted`, `mode=rewrap|reencrypt`).

pub mod jobs;

use crate::err;
use crate::error::Result;
use crate::store::{CopyOptions, RekeyMode, ResPath};

/// Which control file a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Copy,
    Rekey,
    Snapshot,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Copy => "copy",
            Op::Rekey => "rekey",
            Op::Snapshot => "snapshot",
        }
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    Copy {
        src: ResPath,
        dst: ResPath,
        opts: CopyOptions,
    },
    Rekey {
        target: ResPath,
        key: String,
        mode: RekeyMode,
    },
    Snapshot {
        disk: ResPath,
        snapshot: ResPath,
    },
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Request::Copy { .. } => Op::Copy,
            Request::Rekey { .. } => Op::Rekey,
            Request::Snapshot { .. } => Op::Snapshot,
        }
    }

    /// (source, destination) as shown in `jobs`.
    pub fn endpoints(&self) -> (String, String) {
        match self {
            Request::Copy { src, dst, opts } if !opts.to_regions.is_empty() => (
                src.to_string(),
                format!("{dst}@{}", opts.to_regions.join(",")),
            ),
            Request::Copy { src, dst, .. } => (src.to_string(), dst.to_string()),
            Request::Rekey { target, .. } => (target.to_string(), target.to_string()),
            Request::Snapshot { disk, snapshot } => (disk.to_string(), snapshot.to_string()),
        }
    }
}

fn key_value(w: &str) -> Option<(&str, &str)> {
    w.split_once('=')
}

/// Parse one request line written to the control file of `op`.
pub fn parse(op: Op, line: &str) -> Result<Request> {
    if line.len() > 4096 {
        return Err(err!(InvalidInput, "request too long"));
    }
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let usage = || match op {
        Op::Copy => err!(
            InvalidInput,
            "usage: SRC DST [key=K] [encrypt] [unencrypted] [region=R1,R2…]"
        ),
        Op::Rekey => err!(InvalidInput, "usage: TARGET key=K [mode=rewrap|reencrypt]"),
        Op::Snapshot => err!(InvalidInput, "usage: disks/D snapshots/S"),
    };
    let positional: Vec<&str> = words
        .iter()
        .copied()
        .filter(|w| !w.contains('=') && !matches!(*w, "encrypt" | "unencrypted"))
        .collect();
    let mut key: Option<String> = None;
    let mut mode: Option<RekeyMode> = None;
    let mut encrypt = false;
    let mut unencrypted = false;
    let mut regions: Option<Vec<String>> = None;
    for w in &words {
        match (*w, key_value(w)) {
            ("encrypt", _) if op == Op::Copy => {
                if encrypt {
                    return Err(err!(InvalidInput, "'encrypt' given twice"));
                }
                encrypt = true;
            }
            ("unencrypted", _) if op == Op::Copy => {
                if unencrypted {
                    return Err(err!(InvalidInput, "'unencrypted' given twice"));
                }
                unencrypted = true;
            }
            (_, Some(("key", v))) if op != Op::Snapshot => {
                if key.is_some() {
                    return Err(err!(InvalidInput, "key= given twice"));
                }
                if v.is_empty() || v.len() > 300 || !v.bytes().all(|c| c.is_ascii_graphic()) {
                    return Err(err!(InvalidInput, "invalid key '{v}'"));
                }
                key = Some(v.to_string());
            }
            (_, Some(("region", v))) if op == Op::Copy => {
                if regions.is_some() {
                    return Err(err!(InvalidInput, "region= given twice"));
                }
                let list: Vec<String> = v.split(',').map(str::to_string).collect();
                for r in &list {
                    crate::region::validate_name(r)?;
                }
                regions = Some(list);
            }
            (_, Some(("mode", v))) if op == Op::Rekey => {
                if mode.is_some() {
                    return Err(err!(InvalidInput, "mode= given twice"));
                }
                mode = Some(match v {
                    "rewrap" => RekeyMode::Rewrap,
                    "reencrypt" => RekeyMode::Reencrypt,
                    _ => {
                        return Err(err!(
                            InvalidInput,
                            "unknown mode '{v}' (rewrap or reencrypt)"
                        ))
                    }
                });
            }
            (_, Some((k, _))) => {
                return Err(err!(
                    InvalidInput,
                    "unknown option '{k}=' for {}",
                    op.name()
                ))
            }
            ("encrypt", _) | ("unencrypted", _) => {
                return Err(err!(InvalidInput, "'{w}' does not apply to {}", op.name()))
            }
            _ => {}
        }
    }
    match op {
        Op::Copy => {
            let [src, dst] = positional[..] else {
                return Err(usage());
            };
            if unencrypted && (encrypt || key.is_some()) {
                return Err(err!(
                    InvalidInput,
                    "unencrypted conflicts with encrypt and key="
                ));
            }
            Ok(Request::Copy {
                src: ResPath::parse(src)?,
                dst: ResPath::parse(dst)?,
                opts: CopyOptions {
                    encrypt,
                    key,
                    unencrypted,
                    sector_size: None,
                    to_regions: regions.unwrap_or_default(),
                },
            })
        }
        Op::Rekey => {
            let [target] = positional[..] else {
                return Err(usage());
            };
            let key = key.ok_or_else(|| err!(InvalidInput, "rekey needs key=K"))?;
            Ok(Request::Rekey {
                target: ResPath::parse(target)?,
                key,
                mode: mode.unwrap_or(RekeyMode::Rewrap),
            })
        }
        Op::Snapshot => {
            let [disk, snapshot] = positional[..] else {
                return Err(usage());
            };
            Ok(Request::Snapshot {
                disk: ResPath::parse(disk)?,
                snapshot: ResPath::parse(snapshot)?,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn parses_the_documented_forms() {
        let r = parse(Op::Copy, "images/a images/b key=alias/prod\n").unwrap();
        assert_eq!(
            r,
            Request::Copy {
                src: ResPath::parse("images/a").unwrap(),
                dst: ResPath::parse("images/b").unwrap(),
                opts: CopyOptions {
                    key: Some("alias/prod".into()),
                    ..Default::default()
                }
            }
        );
        assert!(
            matches!(parse(Op::Copy, "images/a disks/b encrypt").unwrap(), Request::Copy { opts, .. } if opts.encrypt)
        );
        assert!(
            matches!(parse(Op::Copy, "images/a disks/b unencrypted").unwrap(), Request::Copy { opts, .. } if opts.unencrypted)
        );
        assert!(
            matches!(parse(Op::Copy, "images/a images/a region=eu-1,ap-2").unwrap(), Request::Copy { opts, .. } if opts.to_regions == ["eu-1", "ap-2"])
        );
        assert!(matches!(
            parse(Op::Rekey, "disks/d key=key-1 mode=reencrypt").unwrap(),
            Request::Rekey {
                mode: RekeyMode::Reencrypt,
                ..
            }
        ));
        assert!(matches!(
            parse(Op::Rekey, "disks/d key=key-1").unwrap(),
            Request::Rekey {
                mode: RekeyMode::Rewrap,
                ..
            }
        ));
        assert!(matches!(
            parse(Op::Snapshot, "disks/d snapshots/s").unwrap(),
            Request::Snapshot { .. }
        ));
    }

    #[test]
    fn rejects_bad_requests() {
        for (op, line) in [
            (Op::Copy, ""),
            (Op::Copy, "images/a"),
            (Op::Copy, "images/a images/b images/c"),
            (Op::Copy, "images/a images/b key="),
            (Op::Copy, "images/a images/b key=a key=b"),
            (Op::Copy, "images/a images/b mode=reencrypt"),
            (Op::Copy, "images/a images/b bogus=1"),
            (Op::Copy, "images/a images/b encrypt unencrypted"),
            (Op::Copy, "images/a bad/b"),
            (Op::Copy, "images/a images/b/c"),
            (Op::Copy, "images/a images/b region="),
            (Op::Copy, "images/a images/b region=eu-1,"),
            (Op::Copy, "images/a images/b region=EU"),
            (Op::Copy, "images/a images/b region=a region=b"),
            (Op::Rekey, "disks/d key=k region=eu-1"),
            (Op::Rekey, "disks/d"),
            (Op::Rekey, "disks/d key=k mode=fast"),
            (Op::Rekey, "disks/d key=k encrypt"),
            (Op::Snapshot, "disks/d"),
            (Op::Snapshot, "disks/d snapshots/s key=k"),
        ] {
            let e = parse(op, line).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{op:?} {line:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}", op in 0..3u8) {
            let op = [Op::Copy, Op::Rekey, Op::Snapshot][op as usize];
            let _ = parse(op, &s);
        }
    }
}
