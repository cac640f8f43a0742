"""The SDXL trainer: config, data, models, methods (lora, ti, finetune), loss, loop, save, sample."""
