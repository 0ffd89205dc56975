//! Fuzz the control-file request parser.
//!
//! For every `Op` (copy, rekey, snapshot), `control::parse` on arbitrary UTF-8 must never
//! panic; a request that parses must report the op it was parsed for, its `endpoints()` must
//! be valid resource paths (they re-parse with `ResPath::parse` to the same path), and the
//! request written back in its canonical form must parse to the same request.
#![no_main]

use encimg::control::{parse, Op, Request};
use encimg::store::{RekeyMode, ResPath};
use libfuzzer_sys::fuzz_target;

/// The request as a control-file line, in the documented word order.
fn canonical(r: &Request) -> String {
    match r {
        Request::Copy { src, dst, opts } => {
            let mut s = format!("{src} {dst}");
            if let Some(k) = &opts.key {
                s.push_str(&format!(" key={k}"));
            }
            if opts.encrypt {
                s.push_str(" encrypt");
            }
            if opts.unencrypted {
                s.push_str(" unencrypted");
            }
            s
        }
        Request::Rekey { target, key, mode } => {
            let m = match mode {
                RekeyMode::Rewrap => "rewrap",
                RekeyMode::Reencrypt => "reencrypt",
            };
            format!("{target} key={key} mode={m}")
        }
        Request::Snapshot { disk, snapshot } => format!("{disk} {snapshot}"),
    }
}

fn check(op: Op, line: &str) {
    let Ok(req) = parse(op, line) else { return };
    assert_eq!(req.op(), op, "request parsed for {op:?} reports another op");
    let (a, b) = req.endpoints();
    for e in [&a, &b] {
        let p = ResPath::parse(e)
            .unwrap_or_else(|err| panic!("endpoint {e:?} of {req:?} is not a resource path: {err:?}"));
        assert_eq!(&p.to_string(), e, "endpoint {e:?} does not re-display as itself");
    }
    let line2 = canonical(&req);
    let again = parse(op, &line2)
        .unwrap_or_else(|err| panic!("canonical form {line2:?} of {req:?} does not parse: {err:?}"));
    assert_eq!(again, req, "canonical form {line2:?} parses to another request");
}

fuzz_target!(|data: &[u8]| {
    // Control files are written as text; the mount rejects non-UTF-8 before parsing, but the
    // lossy decoding still gives the parser every byte pattern that survives it.
    let line = String::from_utf8_lossy(data);
    for op in [Op::Copy, Op::Rekey, Op::Snapshot] {
        check(op, &line);
    }
});
