"""Example model file: a small HuggingFace BERT classifier (random weights from a small config,
nothing downloaded) called with keyword inputs, as HuggingFace models are.

    graphopt inspect examples/hf_bert.py
    graphopt optimize examples/hf_bert.py -p cleanup -o out/hf_bert

``example_inputs()`` returns a dict: the model is called as ``model(**example_inputs())`` and the
captured graph takes the same inputs in the same order (``gm(input_ids, attention_mask)`` or by
keyword). The model's ``SequenceClassifierOutput`` comes out of the graph as a plain dict with the
same keys (here ``{"logits": ...}``).
"""

import torch

from graphopt.zoo import hf_model


def model():
    # BertForSequenceClassification(hidden 64, 2 layers, 4 heads, vocab 128), eager attention, no KV cache
    return hf_model("bert")


def example_inputs():
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0  # the second sequence is padded
    return {"input_ids": ids, "attention_mask": mask}


def loss(output, target):
    return torch.nn.functional.cross_entropy(output["logits"], target)
