"""One ``/metrics`` answer for all processes: the master adds up the expositions.

Each process keeps its own registry (trimail.metrics) and sends its text
exposition over its channel when the endpoint is scraped; the master parses
them (prometheus_client's parser) and adds samples with the same name and
labels: counters, histogram buckets, sums and counts add up across processes;
the gauges are either per-process parts of one total (open sessions) or set in
one process only (queue sizes in the master, dead destinations in the qmgr),
so adding is right for them too, except for a flag every smtpd worker sets
(``trimail_smtpd_stress``: 1 while the service is under stress, in each
worker that saw it), which is the largest, not the sum.  ``*_created`` samples
keep the earliest.
The sum of a counter must never fall (Prometheus would take the fall for a
reset and count the other processes' totals again), so the counters and
histograms of a worker that is gone stay in it: the master keeps them
(``cumulative=True``: the worker's last exposition, sent as it exits or taken
at the last scrape), as prometheus_client's multiprocess mode keeps the files
of dead processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client.parser import text_string_to_metric_families

CUMULATIVE = frozenset({"counter", "histogram", "summary"})
FLAGS = frozenset({"trimail_smtpd_stress"})  # 0/1 gauges of one state of the whole service: the largest


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def merge(expositions: Iterable[str], *, cumulative: bool = False) -> bytes:
    """The sum of several text expositions, as one exposition (format 0.0.4);
    *cumulative*: only counters and histograms, without their ``_created``."""
    families: dict[str, tuple[str, str]] = {}  # name -> (type, help), in first-seen order
    samples: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            if cumulative and family.type not in CUMULATIVE:
                continue
            families.setdefault(family.name, (family.type, family.documentation))
            into = samples.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if cumulative and sample.name.endswith("_created"):
                    continue
                if sample.name.endswith("_created"):
                    into[key] = min(into.get(key, sample.value), sample.value)
                elif sample.name in FLAGS:
                    into[key] = max(into.get(key, sample.value), sample.value)
                else:
                    into[key] = into.get(key, 0.0) + sample.value
    lines: list[str] = []
    for name, (kind, documentation) in families.items():
        exposed = name + "_total" if kind == "counter" else name
        lines.append(f"# HELP {exposed} {documentation.replace(chr(92), chr(92) * 2).replace(chr(10), '')}")
        lines.append(f"# TYPE {exposed} {kind}")
        for (sample_name, labels), value in samples[name].items():
            label_text = ",".join(f'{key}="{_escape(label)}"' for key, label in labels)
            lines.append(f"{sample_name}{{{label_text}}} {_number(value)}" if labels
                         else f"{sample_name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode()
