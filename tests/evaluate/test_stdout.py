"""stdout carries only our output: pycocoevalcap's and the PTB tokenizer's prints go elsewhere."""

from uniperceiver_cli.evaluate.metrics import caption_metrics


def test_caption_metrics_print_nothing_on_stdout(capfd):
    scores = caption_metrics({1: "a red circle", 2: "a blue star"},
                             {1: ["a red circle on the left", "a small red circle"], 2: ["a blue star"]})
    assert scores["BLEU-1"] > 0
    assert capfd.readouterr().out == ""  # fd 1, so the Java processes' output counts too
