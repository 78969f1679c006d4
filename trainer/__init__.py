"""A TopK sparse-autoencoder (and TopK transcoder) trainer fed by the activation stream (readers.ActivationStream).

    from trainer import TrainConfig, train
    result = train("data/shuffled", "runs/sae", TrainConfig(n_latents=24576, k=32, batch_size=4096, tokens=10**9))

See docs/trainer.md. The model is trainer.sae.TopKSAE (a transcoder when given d_out; TrainConfig's input and
target name the fields, trainer.fields); latent sharding and data parallelism are in trainer.distributed; the
SAELens export is trainer.export (trainer.saelens_transcoder registers our transcoders with SAELens).
"""

from trainer.config import TrainConfig
from trainer.export import export_saelens, load_saelens
from trainer.sae import TopKSAE
from trainer.train import TrainResult, train

__all__ = ["TopKSAE", "TrainConfig", "TrainResult", "export_saelens", "load_saelens", "train"]
