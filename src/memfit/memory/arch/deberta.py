from memfit.memory.arch.base import Family


class DeBERTa(Family):
    name = "deberta"

    def describe(self, config, model, block, prefix):
        return None
