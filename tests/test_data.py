import numpy as np
import pytest

from charlm import CharlmError
from charlm.data import StreamBatcher, eval_windows


def test_row_i_of_window_k_plus_1_continues_row_i_of_window_k():
    tokens = np.arange(1001, dtype=np.uint16)
    b = StreamBatcher(tokens, batch_size=4, seq_length=10)
    assert b.row_length == 250 and len(b) == 25
    for k in range(len(b) - 1):
        x0, y0 = b.window(k)
        x1, _ = b.window(k + 1)
        assert x0.shape == (4, 10)
        # Targets are inputs shifted by one; each row is a contiguous run of the stream.
        assert (y0[:, :-1] == x0[:, 1:]).all()
        assert (x1[:, 0] == x0[:, -1] + 1).all()
        assert (x1[:, 0] == y0[:, -1]).all()
    # Rows are contiguous slices of the stream, one after another.
    assert [int(b.window(0)[0][i, 0]) for i in range(4)] == [0, 250, 500, 750]


def test_too_short_corpus_is_a_clear_error():
    with pytest.raises(CharlmError, match="fewer than one batch"):
        StreamBatcher(np.arange(50), batch_size=4, seq_length=16)


def test_eval_windows_cover_every_prediction_once():
    tokens = np.arange(103)
    seen = []
    for x, y in eval_windows(tokens, batch_size=1, seq_length=10):
        seen.extend(y[0].tolist())
    assert seen == list(range(1, 103))
