"""See inside a network (`charlm viz`): what each cell tracks over a text, and where the model is unsure.

trace.py runs the text through the model once (the state carried, as eval does) and collects the
cell's internals through the cell contract; predicates.py ranks cells against properties of the
text; gates.py measures gate saturation; surprise.py finds the costliest spans; report.py puts them
together; page.py writes the self-contained HTML page (template page.html); png.py the gate scatter.
"""

from __future__ import annotations

import torch

from charlm.viz.report import Options, build, check
from charlm.viz.trace import Trace, run

__all__ = ["Options", "Trace", "internal_names", "visualize"]


@torch.inference_mode()
def internal_names(model) -> tuple[str, ...]:
    """The names the model's cell gives its internals (one step on a zero input tells)."""
    rnn = model.rnn
    x = torch.zeros(1, 1, rnn.input_size, device=model.head.weight.device)
    acts, _ = rnn.internals(x, rnn.zero_state(1))
    return tuple(acts)


def visualize(
    model, vocab, text: str, opts: Options, unknown: str = "error", about: dict | None = None
) -> tuple[dict, dict, Trace]:
    """Check the options against the model, trace the text, and build (summary, page data, trace)."""
    names = internal_names(model)
    show, _ = check(names, model.rnn.num_layers, model.rnn.hidden_size, opts)
    trace = run(model, vocab, text, unknown, keep={show})  # the page shows one internal; the gates are kept too
    trace.names = names
    summary, data = build(trace, opts, vocab, about)
    return summary, data, trace
