#!/usr/bin/env python3
"""Summarise an Autobahn|Testsuite fuzzingclient report for wshd.

Reads REPORTS/index.json (written by the fuzzingclient) and the per-case JSON
files next to it, prints a per-group table, details every non-OK case, and
exits non-zero when the result is not acceptable:

  * any case whose behavior is FAILED (or any other failing verdict),
  * any NON-STRICT case outside the allowlist (default: none),
  * any UNIMPLEMENTED case outside --allow-unimplemented,
  * any group named in --expect-groups that has no case in the report
    (a run that died half-way).

Exit codes: 0 acceptable, 1 not acceptable, 2 report missing or unreadable.
"""

import argparse
import fnmatch
import json
import os
import re
import sys

GROUP_NAMES = {
    "1": "Framing (text/binary payload lengths)",
    "2": "Pings and pongs",
    "3": "Reserved bits",
    "4": "Reserved opcodes",
    "5": "Fragmentation",
    "6": "UTF-8 handling",
    "7": "Close handling",
    "9": "Limits and performance",
    "10": "Miscellaneous (auto-fragmentation)",
    "12": "permessage-deflate: payloads",
    "13": "permessage-deflate: parameters",
}

OK = "OK"
NON_STRICT = "NON-STRICT"
INFORMATIONAL = "INFORMATIONAL"
UNIMPLEMENTED = "UNIMPLEMENTED"
FAILED = "FAILED"
COLUMNS = [OK, NON_STRICT, INFORMATIONAL, UNIMPLEMENTED, FAILED]

DEFAULT_ALLOW_NON_STRICT = ""


def case_key(case_id):
    out = []
    for part in case_id.split("."):
        try:
            out.append((0, int(part), ""))
        except ValueError:
            out.append((1, 0, part))
    return out


def group_of(case_id):
    return case_id.split(".", 1)[0]


def column_of(behavior):
    """Map a raw behavior to a table column. Unknown verdicts (NO_CLOSE, ...)
    count as FAILED: the suite's own HTML report shows them as 'Fail'."""
    return behavior if behavior in COLUMNS else FAILED


def split_list(text):
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def matches(case_id, patterns):
    return any(case_id == p or fnmatch.fnmatchcase(case_id, p) for p in patterns)


def short(value, limit):
    text = value if isinstance(value, str) else json.dumps(value)
    if isinstance(value, str):
        # The suite's descriptions are HTML fragments.
        text = re.sub(r"<br\s*/?>", " ", text)
        text = re.sub(r"<[^>]+>", "", text)
        text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "... (%d chars)" % len(text)


def load_case(reports, entry):
    name = entry.get("reportfile")
    if not name:
        return {}
    path = os.path.join(reports, name)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"_error": "cannot read %s: %s" % (path, e)}


def summarise_agent(agent, cases, args):
    groups = {}
    for case_id, entry in cases.items():
        g = groups.setdefault(group_of(case_id), {c: 0 for c in COLUMNS})
        g[column_of(entry.get("behavior", FAILED))] += 1

    problems = []
    notes = []
    non_ok = []
    close_warnings = []
    for case_id in sorted(cases, key=case_key):
        entry = cases[case_id]
        behavior = entry.get("behavior", FAILED)
        col = column_of(behavior)
        if col == OK:
            bc = entry.get("behaviorClose", OK)
            if bc not in (OK, INFORMATIONAL):
                close_warnings.append((case_id, bc, entry.get("remoteCloseCode")))
            continue
        non_ok.append(case_id)
        if col == FAILED:
            problems.append("%s: %s" % (case_id, behavior))
        elif col == NON_STRICT:
            if matches(case_id, args.allow_non_strict):
                notes.append("%s: NON-STRICT (allowlisted)" % case_id)
            else:
                problems.append("%s: NON-STRICT (not in allowlist)" % case_id)
        elif col == UNIMPLEMENTED:
            if matches(case_id, args.allow_unimplemented):
                notes.append("%s: UNIMPLEMENTED (allowed)" % case_id)
            else:
                problems.append("%s: UNIMPLEMENTED" % case_id)

    for g in args.expect_groups:
        if g not in groups:
            problems.append("group %s: no case in the report (run incomplete?)" % g)

    # ---- table ----
    print("Autobahn|Testsuite fuzzingclient results for agent %r (%d cases)" % (agent, len(cases)))
    header = ["Group", "Cases"] + COLUMNS
    rows = []
    totals = {c: 0 for c in COLUMNS}
    for g in sorted(groups, key=lambda x: case_key(x)):
        counts = groups[g]
        rows.append([g, str(sum(counts.values()))] + [str(counts[c]) for c in COLUMNS])
        for c in COLUMNS:
            totals[c] += counts[c]
    rows.append(["total", str(sum(totals.values()))] + [str(totals[c]) for c in COLUMNS])
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("%%-%ds" % w if i == 0 else "%%%ds" % w for i, w in enumerate(widths))
    print(fmt % tuple(header))
    print(fmt % tuple("-" * w for w in widths))
    for r in rows:
        print(fmt % tuple(r))

    # ---- details ----
    if non_ok:
        print("\nNon-OK cases:")
    for case_id in non_ok:
        entry = cases[case_id]
        behavior = entry.get("behavior")
        if behavior == INFORMATIONAL and not args.verbose:
            print("  %-8s INFORMATIONAL (close: %s, code %s)" % (
                case_id, entry.get("behaviorClose"), entry.get("remoteCloseCode")))
            continue
        detail = load_case(args.reports, entry)
        print("  %-8s %s (close: %s)" % (case_id, behavior, entry.get("behaviorClose")))
        if "_error" in detail:
            print("           %s" % detail["_error"])
            continue
        lim = args.width
        for label, key in (("description", "description"), ("expectation", "expectation"),
                           ("result", "result"), ("close result", "resultClose")):
            if detail.get(key):
                print("           %-13s %s" % (label + ":", short(detail[key], lim)))
        if detail.get("expected") is not None:
            print("           %-13s %s" % ("expected:", short(detail["expected"], lim)))
        if detail.get("received") is not None:
            print("           %-13s %s" % ("received:", short(detail["received"], lim)))
        if detail.get("expectedClose") is not None:
            print("           %-13s %s" % ("exp. close:", short(detail["expectedClose"], lim)))
        print("           %-13s code=%s reason=%s clean=%s droppedByMe=%s%s" % (
            "observed:", detail.get("remoteCloseCode"), short(detail.get("remoteCloseReason") or "", 80),
            detail.get("wasClean"), detail.get("droppedByMe"),
            (" notClean=%s" % detail["wasNotCleanReason"]) if detail.get("wasNotCleanReason") else ""))

    if close_warnings:
        print("\nOK cases with a non-OK closing behavior (not failing):")
        for case_id, bc, code in close_warnings:
            print("  %-8s close: %s (remote code %s)" % (case_id, bc, code))

    for n in notes:
        print("note: " + n)
    return groups, totals, non_ok, problems


def write_markdown(path, agent, cases, groups, totals, non_ok, args):
    lines = []
    lines.append("| Group | Cases | OK | Non-strict | Informational | Unimplemented | Failed |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for g in sorted(groups, key=case_key):
        c = groups[g]
        name = GROUP_NAMES.get(g, "")
        label = "%s. %s" % (g, name) if name else g
        lines.append("| %s | %d | %s |" % (label, sum(c.values()), " | ".join(str(c[k]) for k in COLUMNS)))
    lines.append("| **Total** | **%d** | %s |" % (
        sum(totals.values()), " | ".join("**%d**" % totals[k] for k in COLUMNS)))
    flagged = [cid for cid in non_ok if cases[cid].get("behavior") != INFORMATIONAL]
    if flagged:
        lines.append("")
        lines.append("Cases not OK:")
        lines.append("")
        for cid in flagged:
            e = cases[cid]
            d = load_case(args.reports, e)
            desc = d.get("description", "") if "_error" not in d else ""
            desc = short(re.split(r"<br\s*/?>", desc)[0], 160)
            lines.append("- `%s` %s%s" % (cid, e.get("behavior"), (": " + desc) if desc else ""))
    info = [cid for cid in non_ok if cases[cid].get("behavior") == INFORMATIONAL]
    if info:
        lines.append("")
        lines.append("Informational cases (no verdict by design): %s." % ", ".join("`%s`" % c for c in info))
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("markdown table written to %s" % path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="?", default=os.path.join(here, "reports"),
                    help="report directory holding index.json (default: tests/autobahn/reports)")
    ap.add_argument("--agent", help="agent name in index.json (default: every agent)")
    ap.add_argument("--allow-non-strict", default=DEFAULT_ALLOW_NON_STRICT, type=split_list,
                    help="comma-separated case ids/globs allowed to be NON-STRICT (default: %(default)s)")
    ap.add_argument("--allow-unimplemented", default="", type=split_list,
                    help="comma-separated case ids/globs allowed to be UNIMPLEMENTED (default: none)")
    ap.add_argument("--expect-groups", default="", type=split_list,
                    help="comma-separated groups that must appear in the report, e.g. 1,2,3,4,5,6,7,9,10")
    ap.add_argument("--markdown", metavar="FILE", help="also write a markdown table to FILE")
    ap.add_argument("--width", type=int, default=200, help="truncate expected/received dumps (default 200)")
    ap.add_argument("-v", "--verbose", action="store_true", help="details for INFORMATIONAL cases too")
    args = ap.parse_args()

    index_path = os.path.join(args.reports, "index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        print("summarize: cannot read %s: %s" % (index_path, e), file=sys.stderr)
        return 2
    agents = [args.agent] if args.agent else sorted(index)
    if not agents or any(a not in index for a in agents):
        print("summarize: agent(s) %s not in %s (has: %s)" % (agents, index_path, sorted(index)), file=sys.stderr)
        return 2

    all_problems = []
    failed_cases = set()
    total_cases = 0
    for n, agent in enumerate(agents):
        if n:
            print()
        cases = index[agent]
        if not cases:
            all_problems.append("%s: report has no cases" % agent)
            continue
        groups, totals, non_ok, problems = summarise_agent(agent, cases, args)
        total_cases += len(cases)
        failed_cases.update((agent, p.split(":", 1)[0]) for p in problems if not p.startswith("group "))
        all_problems += ["%s %s" % (agent, p) for p in problems] if len(agents) > 1 else problems
        if args.markdown:
            md = args.markdown if len(agents) == 1 else "%s.%s" % (args.markdown, agent)
            write_markdown(md, agent, cases, groups, totals, non_ok, args)

    print()
    if all_problems:
        print("AUTOBAHN: NOT CONFORMANT (%d problem(s)):" % len(all_problems))
        for p in all_problems:
            print("  - " + p)
    else:
        if args.allow_non_strict:
            print("AUTOBAHN: OK (no FAILED case, NON-STRICT only in allowlist %s)" % ",".join(args.allow_non_strict))
        else:
            print("AUTOBAHN: OK (no FAILED case, no NON-STRICT case)")
    # The plain closing line CI runners understand.
    print("autobahn: %d passed, %d failed" % (total_cases - len(failed_cases), len(failed_cases)))
    return 1 if all_problems else 0


if __name__ == "__main__":
    sys.exit(main())
