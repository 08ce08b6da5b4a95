from memfit.memory.arch.base import Family


class NeoX(Family):
    name = "neox"

    def describe(self, config, model, block, prefix):
        return None
