"""Data: named corpora (registry, checksummed fetch, source trees), prepare (text -> token ids,
streaming and atomic), the prepared-dir format, and truncated-BPTT batching.

Only the light parts are imported here (reading a prepared dir, batching): decoding commands read
prepared splits without loading the corpus, source-tree or prepare code.
"""

from charlm.data.batching import StreamBatcher, eval_windows, row_span
from charlm.data.prepared import PreparedData

__all__ = ["PreparedData", "StreamBatcher", "eval_windows", "row_span"]
