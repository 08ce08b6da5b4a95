"""What the plain decoder families (GPT-NeoX, Phi, Falcon, GPT-2, OPT) share outside their blocks: a causal-LM head
after rotary tables and the embedding dropout, and a non-gated MLP's backward transients."""

from __future__ import annotations

from memfit.memory.arch import parts
from memfit.memory.arch.base import Family
from memfit.memory.arch.parts import dtypes


class Decoder(Family):
    def embeddings(self, spec) -> int:
        """Rotary cos/sin over the rotated channels (shared by all layers) and the embedding dropout's mask."""
        m, d = spec.model, dtypes(spec)
        mask = parts.dropout_mask(spec.tokens * m.hidden, parts.embedding_dropout(spec), d.residual, d)
        return parts.rotary_tables(spec.seq, m.arch.rotary_dim, d) + mask

    def head(self, spec):
        self.check_task(spec, spec.model.arch.model_type)
        return parts.causal_head(spec, self.embeddings(spec))

    def temporaries(self, spec):
        return parts.block_temporaries(spec, False)
