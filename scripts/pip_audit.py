"""Known-vulnerability check of the installed Python packages (pip-audit), with the project's CI policy.

Policy (docs/SECURITY.md, "Dependencies"):

* every advisory found is printed (package, version, id, aliases, fixed versions);
* an advisory that has a fixed release fails the run (exit 1): upgrade the pin, or add its id with a reason
  to ``scripts/pip-audit-ignore.txt`` (one ``ID  # reason`` a line) when the fix cannot be taken yet;
* an advisory with no fixed release is a warning only: there is nothing to upgrade to, so it is printed,
  tracked in SECURITY.md, and does not fail CI;
* the project itself (installed editable) is skipped; if the vulnerability service cannot be reached the
  run warns and exits 0 (an outage must not block CI, and the next run checks again).

Usage: ``.venv/bin/python scripts/pip_audit.py [--report FILE.json]`` (``--report`` analyses a saved
``pip-audit -f json`` report instead of running pip-audit; used by the tests of this policy).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

IGNORE_FILE = Path(__file__).with_name("pip-audit-ignore.txt")


def ignored_ids(path: Path = IGNORE_FILE) -> set[str]:
    if not path.exists():
        return set()
    out = set()
    for line in path.read_text().splitlines():
        token = line.split("#", 1)[0].strip()
        if token:
            out.add(token)
    return out


def classify(report: dict, ignore: set[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(fixable, unfixable, ignored) advisories of a ``pip-audit -f json`` report."""
    fixable, unfixable, skipped = [], [], []
    for dep in report.get("dependencies", []):
        for vuln in dep.get("vulns", []):
            row = {"name": dep["name"], "version": dep.get("version", "?"), "id": vuln["id"],
                   "aliases": vuln.get("aliases", []), "fix_versions": vuln.get("fix_versions", [])}
            if {row["id"], *row["aliases"]} & ignore:
                skipped.append(row)
            elif row["fix_versions"]:
                fixable.append(row)
            else:
                unfixable.append(row)
    return fixable, unfixable, skipped


def run_pip_audit() -> dict | None:
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", "--skip-editable",
           "--timeout", "30"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"pip-audit: could not run ({err}); skipping the vulnerability check", file=sys.stderr)
        return None
    try:  # exit 1 just means "vulnerabilities found"; the JSON report is on stdout either way
        return json.loads(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        print("pip-audit: no report (vulnerability service unreachable?); skipping: " + " | ".join(tail),
              file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", type=Path, help="analyse a saved `pip-audit -f json` report")
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text()) if args.report else run_pip_audit()
    if report is None:
        return 0
    fixable, unfixable, skipped = classify(report, ignored_ids())
    audited = sum(1 for d in report.get("dependencies", []) if "skip_reason" not in d)

    def show(label: str, rows: list[dict]) -> None:
        for r in rows:
            aliases = f" ({', '.join(r['aliases'])})" if r["aliases"] else ""
            fix = f"fixed in {', '.join(r['fix_versions'])}" if r["fix_versions"] else "no fix released"
            print(f"pip-audit: {label}: {r['name']} {r['version']}: {r['id']}{aliases}: {fix}")

    show("FAIL (fix available)", fixable)
    show("warning (no fix yet)", unfixable)
    show("ignored (scripts/pip-audit-ignore.txt)", skipped)
    print(f"pip-audit: {audited} packages audited; {len(fixable)} fixable, {len(unfixable)} without a fix, "
          f"{len(skipped)} ignored")
    not_audited = [d for d in report.get("dependencies", []) if "skip_reason" in d]
    if not_audited and not audited:  # e.g. the index answers for packages but not for their per-version metadata
        print(f"pip-audit: WARNING: none of the {len(not_audited)} packages could be audited; the first reason: "
              f"{not_audited[0]['skip_reason']}", file=sys.stderr)
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main())
