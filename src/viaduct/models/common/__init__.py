"""Building blocks of the models: plain `nn.Module`s that know nothing of `torch.distributed`."""
