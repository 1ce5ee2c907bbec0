"""Worker of tests/test_distributed.py: `train` as torchrun runs it, one process of a gloo group.

Run with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set: `python tests/ddp_train.py OUT_DIR STOP_AFTER`."""
import json
import sys

import torch

from proxprop_nb.lab.train import RunConfig, train, synthetic_cifar10
from proxprop_nb.distributed import data_parallel, exit_process_group

# lr 0.2: a run far from its stability edge, where float32's other summation order stays at rounding level
CFG = dict(sizes=(192, 32, 16, 10), batch_size=16, epochs=3, lr=0.2, optimization_mode='prox_cg3', tau_prox=0.5)

if __name__ == '__main__':
    out, stop = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    dp = data_parallel('cpu')
    r = train(RunConfig(**CFG), synthetic_cifar10(n_train=64), out, 'cpu', progress=False, stop_after=stop or None)
    with open(f'{out}/rank{dp.rank}.json', 'w') as f:
        json.dump(dict(status=r['status'], history=r.get('history'), data_parallel=r.get('data_parallel'), rank=dp.rank), f)
    exit_process_group()  # waits for the other process, closes the group, ends without interpreter teardown
