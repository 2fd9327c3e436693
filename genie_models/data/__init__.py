"""Video data for Genie: an on-disk episode store, its sources (CoinRun, video folders) and clip sampling.

Sources write shards with EpisodeWriter; training reads them back through EpisodeDataset and ClipSampler.
"""

from genie_models.data.clips import ClipBatch, ClipSampler, gather_clips, iterate_heldout
from genie_models.data.coinrun import NUM_ACTIONS, generate_coinrun
from genie_models.data.shards import DatasetError, Episode, EpisodeDataset, EpisodeWriter
from genie_models.data.video_folder import ingest_video_folder

__all__ = [
    "NUM_ACTIONS",
    "ClipBatch",
    "ClipSampler",
    "DatasetError",
    "Episode",
    "EpisodeDataset",
    "EpisodeWriter",
    "gather_clips",
    "generate_coinrun",
    "ingest_video_folder",
    "iterate_heldout",
]
