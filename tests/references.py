"""Helpers for the tests that compare with PyTorch references (diffusers, transformers): seeded
weights with nothing zero, and tiny T5 tokenizers trained on the spot. Imported only by tests
that need torch or sentencepiece (the JAX-only leg of CI has neither)."""

from __future__ import annotations

import io


def perturb_torch(model, seed: int):
    """Every parameter of a torch module redrawn from a seeded normal: matrices and kernels with
    std 1/sqrt(fan_in) (activations stay O(1)), norm scales N(1, 0.1²), other vectors
    N(0, 0.1²): nothing zero, so every weight's mapping is exercised. Returns it in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, 0.1, generator=generator)
    return model.eval()


def sentencepiece_model(sentences, vocab_size: int) -> bytes:
    """A tiny SentencePiece Unigram model trained on `sentences`, with T5's special ids (pad 0,
    EOS 1, unk 2, no BOS), as the bytes of a spiece.model file."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
        eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2)
    return buffer.getvalue()
