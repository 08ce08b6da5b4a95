from memfit.memory.arch.base import Family


class OPT(Family):
    name = "opt"

    def describe(self, config, model, block, prefix):
        return None
