"""`sharp eval` and `sharp synth`: multiple-choice video QA accuracy of every pruning method.

formats.py reads benchmarks into Items, letters.py builds the prompt and reads the letter back,
runner.py runs the grid with resume and sharding, synth.py writes a synthetic set, and
commands.py holds the two CLI commands (registered in sharp_cli/cli.py).
"""
