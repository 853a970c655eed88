"""verify-shards' cross-check of the samples table against each sample's own members (``.json``, ``.cls``).

The table and its checksum both live outside the tars, so an edit of both (a label, a patient) passes the
table's sha256; the tars are checked against the manifest's per-shard sha256, so their members are the
reference. The comparison takes every field a row shares with its ``.json`` member by name, whatever the
columns are called, so that it follows a renamed or added column without a change here.
"""

from __future__ import annotations

import json

from radstream.shards.index import ShardReader
from radstream.shards.layout import SAMPLES

BY_INDEX = ("key", "split", "bin", "shard", "position", "offset", "size")
"""Row fields the row-against-index check of ``radstream.shards.builder.verify`` compares already (one line per finding)."""


def member_problems(row: dict, members: dict[str, bytes]) -> list[str]:
    """What a samples ``row`` says that its sample's ``members`` contradict: each field the row shares with the
    ``.json`` member (label, patient, split, source …), and ``label_index`` against the ``.cls`` member (none:
    unlabelled, -1). An unreadable ``.json`` is reported by the shard check, not here."""
    try:
        meta = json.loads(members.get("json", b"{}"))
    except ValueError:
        return []
    problems = [
        f"{field} {row[field]!r}, its .json member says {meta[field]!r}"
        for field in sorted(row.keys() & meta.keys())
        if row[field] != meta[field] and field not in BY_INDEX
    ]
    if "label_index" in row:
        cls = members.get("cls")
        try:
            said = int(cls) if cls is not None else -1
        except ValueError:
            return [*problems, f"unreadable .cls member {cls[:20]!r}"]
        if said != row["label_index"]:
            problems.append(f"label_index {row['label_index']}, its .cls member says {said}")
    return problems


def shard_row_problems(reader: ShardReader, rows: dict[int, tuple[int, dict]], keys: list[str]) -> list[str]:
    """:func:`member_problems` for each row of one shard whose position holds its key, one line per row (a row
    that points at the wrong sample is reported by the row-against-index check)."""
    problems = []
    for position, (n, row) in sorted(rows.items(), key=lambda item: item[1][0]):
        if not isinstance(position, int) or not 0 <= position < len(keys) or keys[position] != row.get("key"):
            continue
        found = member_problems(row, reader.sample(position))
        if found:
            problems.append(f"{SAMPLES} row {n} (key {row['key']}, shard {row['shard']}): {'; '.join(found)}")
    return problems
