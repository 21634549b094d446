"""Run train.py's main() under a launcher, then save this process's final weights as <output>/rank<N>.safetensors.

Used by test_train.py to prove that the replicas of a multi-process run hold identical weights.
"""
import importlib.util
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

spec = importlib.util.spec_from_file_location('train_script', Path(__file__).resolve().parents[1] / 'train.py')
train_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train_script)

if __name__ == '__main__':
    result = train_script.main(sys.argv[1:])
    state = {k: v.detach().contiguous() for k, v in result['model'].state_dict().items()}
    save_file(state, str(result['run_dir'] / f'rank{PartialState().process_index}.safetensors'))
