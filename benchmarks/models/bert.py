"""A BERT-style encoder: HuggingFace BertForSequenceClassification from a small config (hidden 256,
4 layers, 4 heads, MLP 1024, vocab 1024; random weights, nothing downloaded), eager attention,
sequence 64 with padding, batch 8. The forward returns the logits tensor.

    graphopt optimize benchmarks/models/bert.py -o out/bert
"""

import torch
from torch import nn

from graphopt.zoo import hf_model

SEQ = 64


class BertLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.bert = hf_model("bert", hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, vocab_size=1024, max_position_embeddings=SEQ).train()

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def model():
    return BertLogits()


def example_inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1024, (8, SEQ), generator=g)
    mask = torch.ones(8, SEQ, dtype=torch.long)
    mask[4:, SEQ * 3 // 4:] = 0  # half the sequences are padded
    return (ids, mask)


def loss(output, target):
    return nn.functional.cross_entropy(output, target)
