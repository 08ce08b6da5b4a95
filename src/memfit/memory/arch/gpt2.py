from memfit.memory.arch.base import Family


class GPT2(Family):
    name = "gpt2"

    def describe(self, config, model, block, prefix):
        return None
