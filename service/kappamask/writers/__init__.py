"""Writers: the mask and confidence COGs, the PNG preview, the STAC item."""
