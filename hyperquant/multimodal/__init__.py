"""Vision-language models: their towers, image-caption data and the inputs their processors build."""
