#!/usr/bin/env python3
"""Turn contrib/bench/run.sh's raw results into one table (stdout) and a JSON file.

usage: report.py RESULTS_DIR OUT_JSON

RESULTS_DIR holds fio/JOB.TARGET.json (fio --output-format=json) and facts.tsv (key<TAB>value
lines written by run.sh). The bars are QUALITY.md's "Performance" section; each is a ratio
against a peer measured in the same run.
"""

import glob
import json
import os
import statistics
import sys

TARGETS = ["disk", "qemu-raw", "qemu-luks", "fuse-pt", "encimg-aes", "encimg-sm4", "encimg-ring"]
CEILING = "fuse-pt"  # libfuse's passthrough_hp, no encryption: the FUSE ceiling
# Jobs where that ceiling bounds encimg too: each cold random read is one device read through
# one FUSE round trip, for any daemon. (Sequential reads are not: encimg reads ahead.)
CEILING_JOBS = {"randread-qd16", "randread-4jobs", "randread-qd1"}

# job -> (label, direction, unit, bars); bar = (peer, minimum ratio of encimg-aes to the peer)
# Every cold read job also has the second round's bar: >= 1.0 x passthrough_hp (fuse-pt).
JOBS = {
    "seqread": ("seq read 1M", "read", "MB/s",
                [("qemu-luks", 4.0), ("qemu-raw", 1.25), ("fuse-pt", 1.0)]),
    "seqwrite": ("seq write 1M +fsync", "write", "MB/s", [("qemu-luks", 2.5)]),
    "randread-qd16": ("rand read 4k qd16", "read", "IOPS", [("qemu-luks", 2.0), ("fuse-pt", 1.0)]),
    "randread-4jobs": ("rand read 4k 4 jobs", "read", "IOPS",
                       [("qemu-luks", 2.0), ("fuse-pt", 1.0)]),
    "randread-qd1": ("rand read 4k qd1", "read", "IOPS", [("qemu-raw", 1.25), ("fuse-pt", 1.0)]),
    "randwrite-qd1": ("rand write 4k qd1 +fsync", "write", "IOPS", [("qemu-luks", 1.1)]),
    "hotread": ("hot read 1M, 2nd pass (buffered)", "read", "MB/s", [("qemu-luks", 5.0)]),
    "fill": ("fill 1M qd4 +fsync (info)", "write", "MB/s", []),
}
PEER_SHORT = {"qemu-luks": "luks", "qemu-raw": "raw", "fuse-pt": "pt"}
SM4_VS_AES = 0.9  # SM4 sequential read >= this x AES, same run
REKEY_LIMIT_MS = 50.0
REKEY_SAME_MS = 10.0  # "the same" time for 64 MiB and 64 GiB: medians within this


def load_facts(d):
    facts = {}
    with open(os.path.join(d, "facts.tsv")) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition("\t")
            facts[k] = v
    return facts


def load_fio(d, job, target):
    """(value in the job's unit, summary dict) or (None, None) when the run is missing. A job
    run in rounds (JOB.TARGET.rN.json) gives its median round (the lower of the middle two
    when even), with every round's value in the summary."""
    pattern = os.path.join(d, "fio", f"{glob.escape(job)}.{glob.escape(target)}.r*.json")
    rounds = sorted(glob.glob(pattern), key=lambda p: int(p.rsplit(".r", 1)[1][:-5]))
    if rounds:
        runs = [load_fio_file(p, job) for p in rounds]
        ok = sorted((r for r in runs if r[0] is not None), key=lambda r: r[0])
        if not ok:
            return None, None
        value, summary = ok[(len(ok) - 1) // 2]
        # In round order (None for a failed round), to compare with the other targets' rounds.
        return value, dict(summary, rounds=[r[0] for r in runs])
    return load_fio_file(os.path.join(d, "fio", f"{job}.{target}.json"), job)


def load_fio_file(path, job):
    """One fio JSON output: (value, summary) or (None, None)."""
    try:
        with open(path) as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    except (OSError, ValueError):
        return None, None
    _, ddir, unit, _ = JOBS[job]
    # --group_reporting folds numjobs into the first entry; otherwise sum the jobs.
    jobs = data["jobs"]
    bw = sum(j[ddir]["bw_bytes"] for j in jobs)
    iops = sum(j[ddir]["iops"] for j in jobs)
    j0 = jobs[0][ddir]
    pct = j0.get("clat_ns", {}).get("percentile", {})
    summary = {
        "MBps": bw / 1e6,
        "iops": iops,
        "io_bytes": sum(j[ddir]["io_bytes"] for j in jobs),
        "runtime_ms": max(j[ddir]["runtime"] for j in jobs),
        "clat_mean_us": j0.get("clat_ns", {}).get("mean", 0) / 1e3,
        "clat_p50_us": pct.get("50.000000", 0) / 1e3,
        "clat_p99_us": pct.get("99.000000", 0) / 1e3,
    }
    return (summary["MBps"] if unit == "MB/s" else summary["iops"]), summary


def criterion(facts):
    """{(group, function): bytes per second} for the 4KiB benches run in this run."""
    d, since = facts.get("criterion_dir"), float(facts.get("criterion_since", 0))
    out = {}
    if not d:
        return out
    for group in ("aes-xts-plain64", "sm4-xts-plain64"):
        for fn in ("encimg", "xts-mode"):
            p = os.path.join(d, group, fn, "4KiB", "new", "estimates.json")
            try:
                if os.path.getmtime(p) < since:
                    continue  # stale: from an earlier run
                with open(p) as f:
                    ns = json.load(f)["mean"]["point_estimate"]
                out[(group, fn)] = 4096 / ns * 1e9
            except (OSError, ValueError, KeyError):
                pass
    return out


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == "IOPS":
        return f"{v / 1000:.1f}k"
    if unit == "ms":
        return f"{v:.1f}"
    if unit in ("GB/s", "ratio"):
        return f"{v:.2f}"
    return f"{v:.0f}"


def verdict(ok):
    return "PASS" if ok else "MISS"


def main():
    d, out_path = sys.argv[1], sys.argv[2]
    facts = load_facts(d)
    results = {"facts": facts, "fio": {}, "bars": []}
    rows = []  # (workload, unit, {col: value}, ratio_luks, ratio_raw, bar text)

    def ratio(a, b):
        return a / b if a is not None and b else None

    for job, (label, _, unit, bars) in JOBS.items():
        vals, summ = {}, {}
        for t in TARGETS:
            vals[t], summ[t] = load_fio(d, job, t)
        results["fio"][job] = {"unit": unit, "options": facts.get(f"job:{job}", ""),
                               "value": vals, "detail": summ}
        aes = vals["encimg-aes"]
        texts = []
        ceiling = vals[CEILING]
        for peer, need in bars:
            r = ratio(aes, vals[peer])
            ok = r is not None and r >= need
            text = f"≥{need:g}×{PEER_SHORT[peer]} " + (verdict(ok) if r is not None else "n/a")
            # A missed bar that asks for more than a FUSE daemon with no encryption reached
            # in this run: say so beside it.
            above = (job in CEILING_JOBS and r is not None and ceiling is not None
                     and need * vals[peer] > ceiling)
            if above and not ok:
                text += (f" (needs {fmt(need * vals[peer], unit)}, more than the "
                         f"passthrough's {fmt(ceiling, unit)})")
            texts.append(text)
            results["bars"].append({"what": label, "bar": f">= {need} x {peer}", "ratio": r,
                                    "pass": ok, "needs": need * vals[peer] if vals[peer] else None,
                                    "fuse_ceiling": ceiling, "above_fuse_ceiling": above})
        rows.append((label, unit, vals, ratio(aes, vals["qemu-luks"]),
                     ratio(aes, vals["qemu-raw"]), "; ".join(texts) or "(info)"))

    extra = []  # (workload, unit, {col: value}, bar text)
    seq = results["fio"].get("seqread", {}).get("value", {})
    r = ratio(seq.get("encimg-sm4"), seq.get("encimg-aes"))
    if r is not None:
        extra.append(("seq read 1M, SM4 / AES", "ratio", {"encimg-sm4": r},
                      f"≥{SM4_VS_AES:g}×aes {verdict(r >= SM4_VS_AES)}"))
        results["bars"].append({"what": "SM4 sequential read vs AES", "bar": f">= {SM4_VS_AES} x AES",
                                "ratio": r, "pass": r >= SM4_VS_AES})
    size = int(facts["size_bytes"])

    # Copy with key replaced vs cp --sparse=never (+ sync).
    if "encimg_copy_ms" in facts and "cp_sync_ms" in facts:
        enc = size / (int(facts["encimg_copy_ms"]) / 1e3) / 1e6
        cp = size / (int(facts["cp_sync_ms"]) / 1e3) / 1e6
        cp_only = size / (max(int(facts["cp_ms"]), 1) / 1e3) / 1e6
        r = enc / cp
        extra.append(("copy, new key (disk=cp+sync)", "MB/s", {"disk": cp, "encimg-aes": enc},
                      f"≥0.8×cp: {r:.2f}× {verdict(r >= 0.8)}"))
        results["copy"] = {"encimg_copy_MBps": enc, "cp_sync_MBps": cp, "cp_only_MBps": cp_only,
                           "ratio": r, "pass": r >= 0.8}
        results["bars"].append({"what": "copy with key replaced", "bar": ">= 0.8 x cp+sync",
                                "ratio": r, "pass": r >= 0.8})

    # Cross-region copy to five regions vs five cp --sparse=never (+ sync).
    if "xregion5_ms" in facts and "cp5_sync_ms" in facts:
        enc = 5 * size / (int(facts["xregion5_ms"]) / 1e3) / 1e6
        cp = 5 * size / (int(facts["cp5_sync_ms"]) / 1e3) / 1e6
        r = enc / cp
        extra.append(("copy to 5 regions (disk=5×cp+sync)", "MB/s", {"disk": cp, "encimg-aes": enc},
                      f"≥1.0×5 cp: {r:.2f}× {verdict(r >= 1.0)}"))
        results["copy_to_regions"] = {"encimg_MBps": enc, "cp5_sync_MBps": cp, "ratio": r,
                                      "pass": r >= 1.0}
        results["bars"].append({"what": "cross-region copy to five regions",
                                "bar": ">= 1.0 x five cp+sync", "ratio": r, "pass": r >= 1.0})

    # Rekey by rewrap: medians.
    if "rekey_64m_us" in facts:
        m = statistics.median(int(x) for x in facts["rekey_64m_us"].split()) / 1e3
        g = statistics.median(int(x) for x in facts["rekey_64g_us"].split()) / 1e3
        ok = m < REKEY_LIMIT_MS and g < REKEY_LIMIT_MS and abs(g - m) <= REKEY_SAME_MS
        extra.append(("rekey rewrap 64 MiB (median)", "ms", {"encimg-aes": m},
                      f"<{REKEY_LIMIT_MS:g} ms {verdict(m < REKEY_LIMIT_MS)}"))
        extra.append(("rekey rewrap 64 GiB sparse", "ms", {"encimg-aes": g},
                      f"<{REKEY_LIMIT_MS:g} ms, ≈64MiB (±{REKEY_SAME_MS:g}) {verdict(ok)}"))
        results["rekey"] = {"median_ms_64MiB": m, "median_ms_64GiB": g,
                            "runs_us_64MiB": facts["rekey_64m_us"],
                            "runs_us_64GiB": facts["rekey_64g_us"], "pass": ok}
        results["bars"].append({"what": "rekey by rewrap", "bar": "< 50 ms, 64 GiB ~ 64 MiB",
                                "ratio": g / m if m else None, "pass": ok})

    # Daemon peak RSS over every encimg fio run (the mount is restarted per job).
    hwm = {k.split(":", 1)[1]: int(v) for k, v in facts.items() if k.startswith("hwm_kb:")}
    if hwm:
        peak_label = max(hwm, key=hwm.get)
        peak = hwm[peak_label] / 1024
        limit = int(facts["cache_bytes"]) / 2**20 + 64
        extra.append(("daemon peak RSS (VmHWM)", "MiB", {"encimg-aes": peak},
                      f"≤{limit:g} MiB (cache {facts['cache_size']}+64M) {verdict(peak <= limit)}"))
        results["rss"] = {"peak_MiB": peak, "peak_during": peak_label, "limit_MiB": limit,
                          "per_run_kB": hwm, "pass": peak <= limit}
        results["bars"].append({"what": "daemon RSS", "bar": f"<= {limit} MiB",
                                "ratio": peak / limit, "pass": peak <= limit})

    # Sector crypto, one core.
    crit = criterion(facts)
    results["crypto"] = {"openssl_aes_256_xts_Bps": None, "openssl_sm4_ctr_Bps": None,
                         "criterion_4KiB_Bps": {f"{g}/{f}": v for (g, f), v in crit.items()}}
    for group, col, okey, oname, need in (
            ("aes-xts-plain64", "encimg-aes", "openssl_aes_256_xts_kBps", "aes-256-xts", 1.5),
            ("sm4-xts-plain64", "encimg-sm4", "openssl_sm4_ctr_kBps", "sm4-ctr", 5.0)):
        try:
            ossl = float(facts.get(okey, "")) * 1e3
        except ValueError:
            ossl = None
        results["crypto"][okey.replace("_kBps", "_Bps")] = ossl
        ours = crit.get((group, "encimg"))
        crate = crit.get((group, "xts-mode"))
        r = ours / ossl if ours and ossl else None
        name = "AES" if col == "encimg-aes" else "SM4"
        bar = f"≥{need:g}×openssl {oname} {fmt(ossl / 1e9 if ossl else None, 'GB/s')} GB/s: "
        bar += f"{r:.2f}× {verdict(r >= need)}" if r is not None else "n/a"
        if crate:
            bar += f" (xts-mode crate {crate / 1e9:.2f})"
        extra.append((f"{name}-XTS 4KiB, 1 core", "GB/s", {col: ours / 1e9 if ours else None}, bar))
        results["bars"].append({"what": f"{name}-XTS sector crypto", "bar": f">= {need} x openssl {oname}",
                                "ratio": r, "pass": r is not None and r >= need})

    # ---- the table ----
    head = ["workload", "unit", *TARGETS, "aes/luks", "aes/raw", "aes/pt", "bar (encimg-aes)"]
    table = []
    for label, unit, vals, rl, rr, bar in rows:
        rp = ratio(vals["encimg-aes"], vals[CEILING])
        table.append([label, unit, *(fmt(vals[t], unit) for t in TARGETS),
                      *(f"{x:.2f}×" if x is not None else "-" for x in (rl, rr, rp)), bar])
    sep = len(table)
    for label, unit, vals, bar in extra:
        table.append([label, unit, *(fmt(vals.get(t), unit) if t in vals else "" for t in TARGETS),
                      "", "", "", bar])
    widths = [max(len(str(r[i])) for r in [head, *table]) for i in range(len(head))]

    def line(r):
        cells = [str(c).ljust(widths[i]) if i in (0, 1, len(head) - 1) else str(c).rjust(widths[i])
                 for i, c in enumerate(r)]
        return " | ".join(cells).rstrip()

    rule = "-+-".join("-" * w for w in widths)
    print()
    print(f"CPU: {facts.get('cpu_model')} ({facts.get('cpus')} CPUs; flags: {facts.get('cpu_flags', '').strip()})")
    rounds = int(facts.get("rounds", 1))
    print(f"{int(facts['size_bytes']) / 2**30:g} GiB per target (filled first); fio --direct=1; reads: one "
          f"cold pass (each block once), at most {facts['runtime_s']} s; writes: {facts['runtime_s']} s, then "
          f"fsync (counted)"
          + (f"; {rounds} rounds (targets in turn, reversed every other round), median shown" if rounds > 1 else ""))
    print(f"page cache dropped before each job; qemu: cache.direct=on,aio=native; encimg: --cache-size "
          f"{facts['cache_size']}, mount restarted before each job")
    print(f"load average at start {facts.get('loadavg_start')}, at end {facts.get('loadavg_end')}; "
          f"{facts.get('fio_version')}, {facts.get('qemu_version')}, {facts.get('openssl_version')}, "
          f"encimg {facts.get('encimg_commit')}")
    if any(v.get("value", {}).get("encimg-ring") is not None for v in results["fio"].values()):
        print("encimg-ring: the AES disk through `mount --io-uring` (FUSE over io_uring); the bars "
              "are judged on encimg-aes (requests read from the FUSE device)")
    if facts.get("passthrough"):
        print(f"fuse-pt: libfuse's example {facts['passthrough']} (16 threads, clone_fd, no splice, no "
              "encryption, no cache) over a raw file on the same disk: the FUSE ceiling")
    busy = [float(v) for k, v in facts.items() if k.startswith("busy:")]
    if busy:
        print(f"other load before the fio jobs: CPUs {statistics.mean(busy):.0f}% busy on average, "
              f"{max(busy):.0f}% at most (sampled 0.5 s before each job)")
        if statistics.mean(busy) > 20 or max(busy) > 50:
            print("WARNING: the machine was busy with other work; CPU-bound FUSE daemons (qemu-luks, "
                  "encimg) suffer most. Rerun on an idle machine before trusting the ratios.")
    results["other_cpu_busy_pct"] = {k.split(":", 1)[1]: float(v) for k, v in facts.items()
                                     if k.startswith("busy:")}
    print()
    print(line(head))
    print(rule)
    for i, r in enumerate(table):
        if i == sep:
            print(rule)
        print(line(r))
    print()
    # Every round of the jobs run in rounds, as ratios to the FUSE ceiling: the spread.
    for job, (label, _, unit, _) in JOBS.items():
        det = results["fio"].get(job, {}).get("detail", {})
        pt = (det.get(CEILING) or {}).get("rounds")
        if not pt:
            continue
        cells = []
        for t in ("encimg-aes", "encimg-sm4"):
            rs = (det.get(t) or {}).get("rounds")
            if rs:
                per = [f"{a / b:.2f}×" if a and b else "-" for a, b in zip(rs, pt)]
                cells.append(f"{t} {', '.join(fmt(v, unit) for v in rs)} ({' '.join(per)})")
        print(f"rounds, {label}: {CEILING} {', '.join(fmt(v, unit) for v in pt)}; " + "; ".join(cells))
    passed = sum(1 for b in results["bars"] if b["pass"])
    print(f"bars: {passed}/{len(results['bars'])} PASS; total run time {facts.get('total_s')} s")

    with open(out_path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


if __name__ == "__main__":
    main()
