from memfit.memory.arch.base import Family


class Phi(Family):
    name = "phi"

    def describe(self, config, model, block, prefix):
        return None
