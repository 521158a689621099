"""AdaCache pass (filled in by the AdaCache issue)."""


def run(gm, structure, config):
    raise NotImplementedError
