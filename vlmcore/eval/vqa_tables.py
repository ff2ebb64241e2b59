"""The tables of the official VQA evaluation's answer normalization and of OK-VQA's stemming.

Data, not code: the values of ``vqaEval.py`` (GT-Vision-Lab/VQA, PythonEvaluationTools) and of the OK-VQA
v1.1 stemming procedure's manual matches (as OpenFlamingo's ``ok_vqa_utils.py`` ships them). Kept verbatim,
quirks included (``"somebody'd": "somebodyd"``), because scores are only comparable with the same tables.
"""

# A word written without its apostrophe -> the contraction (applied after lower-casing).
CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't", 'dont': "don't",
    'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't", 'havent': "haven't",
    'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's", 'howd': "how'd", 'howll': "how'll",
    'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm", 'Ive': "I've", 'isnt': "isn't", 'itd': "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll", "let's": "let's", 'maam': "ma'am",
    'mightnt': "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've", 'mightve': "might've",
    'mustnt': "mustn't", 'mustve': "must've", 'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock",
    'oughtnt': "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've", 'shouldnt': "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": 'somebodyd',
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", 'somebodyll': "somebody'll",
    'somebodys': "somebody's", 'someoned': "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    'someonell': "someone'll", 'someones': "someone's", 'somethingd': "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", 'somethingll': "something'll",
    'thats': "that's", 'thered': "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    'therere': "there're", 'theres': "there's", 'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    'theyll': "they'll", 'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll",
    'whatre': "what're", 'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd",
    'wheres': "where's", 'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    'wholl': "who'll", 'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}

# Number words -> digits (``none`` counts as 0, as in the official evaluation).
NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3', 'four': '4', 'five': '5', 'six': '6',
    'seven': '7', 'eight': '8', 'nine': '9', 'ten': '10',
}

ARTICLES = ('a', 'an', 'the')

# Removed (or replaced by a space) by the punctuation step; "." and "," inside numbers have their own rules.
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',', '?', '!')

# OK-VQA v1.1: words its automatic stemming rules miss or get wrong -> their stem.
OKVQA_MANUAL_STEMS = {
    'police': 'police', 'las': 'las', 'vegas': 'vegas', 'yes': 'yes', 'jeans': 'jean', "hell's": 'hell',
    "domino's": 'domino', 'morning': 'morn', 'clothes': 'cloth', 'are': 'are', 'riding': 'ride', 'leaves': 'leaf',
    'dangerous': 'danger', 'clothing': 'cloth', 'texting': 'text', 'kiting': 'kite', 'firefighters': 'firefight',
    'ties': 'tie', 'married': 'married', 'teething': 'teeth', 'gloves': 'glove', 'tennis': 'tennis', 'dining': 'dine',
    'directions': 'direct', 'waves': 'wave', 'christmas': 'christmas', 'drives': 'drive', 'pudding': 'pud',
    'coding': 'code', 'plating': 'plate', 'quantas': 'quanta', 'hornes': 'horn', 'graves': 'grave', 'mating': 'mate',
    'paned': 'pane', 'alertness': 'alert', 'sunbathing': 'sunbath', 'tenning': 'ten', 'wetness': 'wet',
    'urinating': 'urine', 'sickness': 'sick', 'braves': 'brave', 'firefighting': 'firefight', 'lenses': 'lens',
    'reflections': 'reflect', 'backpackers': 'backpack', 'eatting': 'eat', 'designers': 'design',
    'curiousity': 'curious', 'playfulness': 'play', 'blindness': 'blind', 'hawke': 'hawk', 'tomatoe': 'tomato',
    'rodeoing': 'rodeo', 'brightness': 'bright', 'circuses': 'circus', 'skateboarders': 'skateboard',
    'staring': 'stare', 'electronics': 'electron', 'electicity': 'elect', 'mountainous': 'mountain',
    'socializing': 'social', 'hamburgers': 'hamburg', 'caves': 'cave', 'transitions': 'transit', 'wading': 'wade',
    'creame': 'cream', 'toileting': 'toilet', 'sautee': 'saute', 'buildings': 'build', 'belongings': 'belong',
    'stockings': 'stock', 'walle': 'wall', 'cumulis': 'cumuli', 'travelers': 'travel', 'conducter': 'conduct',
    'browsing': 'brows', 'pooping': 'poop', 'haircutting': 'haircut', 'toppings': 'top', 'hearding': 'heard',
    'sunblocker': 'sunblock', 'bases': 'base', 'markings': 'mark', 'mopeds': 'mope', 'kindergartener': 'kindergarten',
    'pies': 'pie', 'scrapbooking': 'scrapbook', 'couponing': 'coupon', 'meetings': 'meet', 'elevators': 'elev',
    'lowes': 'low', "men's": 'men', 'childrens': 'children', 'shelves': 'shelve', 'paintings': 'paint',
    'raines': 'rain', 'paring': 'pare', 'expressions': 'express', 'routes': 'rout', 'pease': 'peas',
    'vastness': 'vast', 'awning': 'awn', "boy's": 'boy', 'drunkenness': 'drunken', 'teasing': 'teas',
    'conferences': 'confer', 'ripeness': 'ripe', 'suspenders': 'suspend', 'earnings': 'earn', 'reporters': 'report',
    "kid's": 'kid', 'containers': 'contain', 'corgie': 'corgi', 'porche': 'porch', 'microwaves': 'microwave',
    "batter's": 'batter', 'sadness': 'sad', 'apartments': 'apart', 'oxygenize': 'oxygen', 'striping': 'stripe',
    'purring': 'pure', 'professionals': 'profession', 'piping': 'pipe', "farmer's": 'farmer', 'potatoe': 'potato',
    'emirates': 'emir', 'womens': 'women', "veteran's": 'veteran', 'wilderness': 'wilder', 'propellers': 'propel',
    'alpes': 'alp', 'charioteering': 'chariot', 'swining': 'swine', 'illness': 'ill', 'crepte': 'crept',
    'adhesives': 'adhesive', "regent's": 'regent', 'decorations': 'decor', 'rabbies': 'rabbi', 'overseas': 'oversea',
    'travellers': 'travel', 'casings': 'case', 'smugness': 'smug', 'doves': 'dove', 'nationals': 'nation',
    'mustange': 'mustang', 'ringe': 'ring', 'gondoliere': 'gondolier', 'vacationing': 'vacate', 'reminders': 'remind',
    'baldness': 'bald', 'settings': 'set', 'glaced': 'glace', 'coniferous': 'conifer', 'revelations': 'revel',
    'personals': 'person', "daughter's": 'daughter', 'badness': 'bad', 'projections': 'project',
    'polarizing': 'polar', 'vandalizers': 'vandal', 'minerals': 'miner', 'protesters': 'protest',
    'controllers': 'control', 'weddings': 'wed', 'sometimes': 'sometime', 'earing': 'ear',
}
