"""A vLLM worker (for `worker_cls`) whose model runner loads its model without the plugin's runner seams, as a model
runner the plugin does not know would: the plugin must refuse to start it with steering on."""

from vllm.config import set_current_vllm_config
from vllm.v1.worker.cpu_worker import CPUWorker


class UnhookedWorker(CPUWorker):
    def load_model(self, *args, **kwargs):
        runner = self.model_runner
        load = type(runner).load_model
        with set_current_vllm_config(self.vllm_config):
            getattr(load, "__wrapped__", load)(runner, *args, **kwargs)  # the runner's own, unwrapped
