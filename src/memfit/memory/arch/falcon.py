from memfit.memory.arch.base import Family


class Falcon(Family):
    name = "falcon"

    def describe(self, config, model, block, prefix):
        return None
