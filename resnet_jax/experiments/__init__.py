"""The paper's experiments, reproduced and drawn: `python -m resnet_jax.experiments`.

    command.py      the command line: NAME --out DIR [options]; what each experiment writes
    nets.py         the nets each experiment compares, and the paper's numbers for them
    runs.py         their training runs: configs, workdirs, reuse, one-by-one or --jobs
    train_one.py    one run in a subprocess (how --jobs runs in parallel)
    error_tables.py depth / shortcuts: test error tables and Figure 6 style curves
    responses.py    Figure 7: std of every 3x3 layer's response
    table2.py       Table 2 / Figure 4: plain-18/34 vs ResNet-18/34 (option A), 10-crop errors
    provenance.py   command, machine, date, wall time and versions of a result
"""
