"""`sharp eval` and `sharp synth`: multiple-choice video QA accuracy of every pruning method.

formats.py reads benchmarks into Items, letters.py builds the prompt and reads the letter back,
runner.py runs the grid of methods, ratios and seeds with resume and sharding (together.py: cells
decoded together; records.py: the line each cell writes, shared by both), summary.py turns the
results into rows (stats.py: spread and paired bootstrap intervals; needles.py: needle recall@k;
agreement.py: agreement with the unpruned model), table.py prints them, synth.py writes a
synthetic set, and commands.py holds the two CLI commands (registered in sharp_cli/cli.py).
"""
